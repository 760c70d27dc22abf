"""``python -m service``: serve every checkpoint in a model dir with uvicorn (one worker, one process).

Every Settings field is a flag (``--max-batch-size 8``, ``--no-channels-last``); only flags actually given
override the ``MACULA_*`` environment. SIGTERM/SIGINT: readiness turns 503 at once, no new predictions are
taken, everything accepted is answered (bounded by ``--drain-timeout-s``), the audit store is flushed.
"""

from __future__ import annotations

import argparse
import logging

from pydantic import ValidationError

from . import server
from .app import create_app
from .server import DrainingServer
from .settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS)
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"MACULA_{name.upper()}"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(env {env})")
        else:
            default = "" if field.default is None else f", default {field.default}"
            parser.add_argument(flag, dest=name, metavar=name.split("_")[-1].upper(), help=f"(env {env}{default})")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        settings = Settings(**vars(parser.parse_args(argv)))
    except ValidationError as exc:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    DrainingServer(server.config(app, settings)).run()


if __name__ == "__main__":
    main()
