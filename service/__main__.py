"""``python -m service``: serve every checkpoint in a model dir with uvicorn (one worker, one process).

Every Settings field is a flag (``--max-batch-size 8``, ``--no-channels-last``); only flags actually given
override the ``MACULA_*`` environment. SIGTERM/SIGINT: readiness turns 503 at once, no new predictions are
taken, everything accepted is answered (bounded by ``--drain-timeout-s``), the audit store is flushed, and the
process exits with status 0 (130 when a second Ctrl-C cut the drain short).
"""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

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
        if field.annotation in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(env {env})")
        else:
            default = "" if field.default is None else f", default {field.default}"
            parser.add_argument(flag, dest=name, metavar=name.split("_")[-1].upper(), help=f"(env {env}{default})")
    return parser


def exit_0_after_shutdown(http_server: DrainingServer) -> None:
    """Make a graceful shutdown on SIGTERM/SIGINT end the process with status 0.

    Since 0.29 uvicorn hands each signal it caught, after its graceful shutdown, to the handler that was in place
    before it started ("cooperative signal handling"). With Python's defaults that handler kills the process with
    the signal (SIGTERM: status 143, and ``make serve`` says ``Error 2``) or raises KeyboardInterrupt. A service
    that has drained did what the signal asked, so the handler put in place here exits with 0 instead, or with
    128 + the signal when a second Ctrl-C forced the exit.
    """
    def exit_after_shutdown(sig: int, frame: Any) -> None:
        raise SystemExit(128 + sig if http_server.force_exit else 0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, exit_after_shutdown)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        settings = Settings(**vars(parser.parse_args(argv)))
    except ValidationError as exc:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    http_server = DrainingServer(server.config(app, settings))
    exit_0_after_shutdown(http_server)
    http_server.run()
    if app.state.service.start_error is not None:  # the models failed to load after the port opened
        raise SystemExit(f"could not start: {app.state.service.start_error}")


if __name__ == "__main__":
    main()
