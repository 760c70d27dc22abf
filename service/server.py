"""The HTTP server around the app: uvicorn with a deadline on the request line and headers, and a drain on
SIGTERM/SIGINT.

uvicorn closes a connection that sits idle between requests (``timeout_keep_alive``) but waits forever for the
rest of a request whose first bytes arrived; :class:`HeaderDeadlineProtocol` answers 408 and closes the
connection when the request line and headers are not complete within ``read_timeout_s`` of the connection
opening or of the first byte of a request. The app's own body guard (limits.py) takes over from there.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import classify
from .limits import ReadTimeout
from .settings import Settings


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for the request line and headers (``headers_timeout_s``)."""

    headers_timeout_s: float = 20.0
    answer: bytes = b'{"detail": "the request line and headers did not arrive in time", "code": "request_timeout"}'
    on_timeout: Any = None  # called with no argument each time the deadline closes a connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_timer: asyncio.TimerHandle | None = None
        self._start_headers_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_headers_timer()

    def on_headers_complete(self) -> None:
        self._cancel_headers_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_headers_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._cancel_headers_timer()  # between requests uvicorn's keep-alive timeout applies
        super().on_response_complete()

    def _start_headers_timer(self) -> None:
        self._cancel_headers_timer()
        self._headers_timer = self.loop.call_later(self.headers_timeout_s, self._headers_too_slow)

    def _cancel_headers_timer(self) -> None:
        timer = getattr(self, "_headers_timer", None)
        if timer is not None:
            timer.cancel()
            self._headers_timer = None

    def _headers_too_slow(self) -> None:
        self._headers_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(self.answer)).encode()
                             + b"\r\n\r\n" + self.answer)
        self.transport.close()
        if self.on_timeout is not None:
            self.on_timeout()


def protocol_for(app: FastAPI, settings: Settings) -> type[HeaderDeadlineProtocol]:
    """The protocol class for this app: its headers deadline, answered and counted by the app's error handler."""
    handler = app.state.error_handler
    timeout = ReadTimeout(settings.read_timeout_s)
    code = classify(timeout)[0]  # request_timeout, status 408 (errors.CODES)
    answer = json.dumps({"detail": "the request line and headers did not arrive within "
                                   f"{settings.read_timeout_s:g} s", "code": code}).encode()
    return type("MaculaHttpProtocol", (HeaderDeadlineProtocol,),
                {"headers_timeout_s": settings.read_timeout_s, "answer": answer,
                 "on_timeout": staticmethod(lambda: handler.count(timeout))})


def config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's config for ``app``: one worker, the headers deadline, the drain timeout as the graceful one."""
    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level.lower(),
                               "workers": 1, "lifespan": "on", "http": protocol_for(app, settings),
                               "timeout_graceful_shutdown": math.ceil(settings.drain_timeout_s)}
    return uvicorn.Config(app, **{**options, **overrides})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: the moment a shutdown signal arrives, the service stops being ready and starts
    its drain clock (requests still unanswered near the drain timeout get JSON 503 ``not_ready``)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.service.begin_drain()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        """Also stop when the service could not start (models load after the port opened): the process then
        exits non-zero (``python -m service``) instead of answering 503 for ever."""
        if self.config.app.state.service.start_error is not None:
            self.should_exit = True
        return await super().on_tick(counter)
