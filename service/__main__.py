"""``python -m service``: serve every checkpoint in a model dir with uvicorn (one worker, one process).

Every Settings field is a flag (``--max-batch-size 8``, ``--no-channels-last``); only flags actually given
override the ``MACULA_*`` environment. SIGTERM/SIGINT: readiness turns 503 at once, no new predictions are
taken, everything accepted is answered (bounded by ``--drain-timeout-s``), the audit store is flushed, and the
process exits with status 0 (130 when a second Ctrl-C cut the drain short).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
from typing import Any

import uvicorn
from pydantic import ValidationError

from .app import create_app
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


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: the moment a shutdown signal arrives, the service stops being ready; once it has
    shut down, the process exits with status 0.

    Since 0.29 uvicorn hands each signal it caught, after its graceful shutdown, to the handler that was in place
    before it started ("cooperative signal handling"). With Python's defaults that handler kills the process with
    the signal (SIGTERM: status 143, and ``make serve`` says ``Error 2``) or raises KeyboardInterrupt. A service
    that has drained did what the signal asked, so :meth:`run` puts :meth:`exit_after_shutdown` there first.
    """

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.service.begin_drain()
        super().handle_exit(sig, frame)

    def run(self, sockets: list | None = None) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.exit_after_shutdown)
        super().run(sockets)

    def exit_after_shutdown(self, sig: int, frame: Any) -> None:
        """Status 0 after a graceful shutdown; 128 + the signal when a second Ctrl-C forced the exit."""
        raise SystemExit(128 + sig if self.force_exit else 0)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        settings = Settings(**vars(parser.parse_args(argv)))
    except ValidationError as exc:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            workers=1, lifespan="on", timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s))
    DrainingServer(config).run()


if __name__ == "__main__":
    main()
