"""How much and how fast a request body may arrive: a pure ASGI middleware that wraps ``receive``.

``Content-Length`` is checked before a byte is read; bodies without it (chunked) are counted as they arrive and cut
off at the limit, so an oversize upload never sits in memory or on disk in full. The whole body must arrive within
``read_timeout_s`` of the first read, so a client that stops sending (or trickles) is answered 408 instead of
holding a connection and a handler forever. Nothing is answered here: the exceptions below are raised from
``receive`` into the route that reads the body, and the one error handler (errors.py) answers them. The deadline
for the request line and headers is the server's (server.py): the app only sees a request once they are complete.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")


class BadContentLength(Exception):
    def __init__(self) -> None:
        super().__init__("malformed Content-Length header")


class ReadTimeout(Exception):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")


class BodyGuard:
    def __init__(self, app: ASGIApp, *, max_bytes: int, read_timeout_s: float) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, self._guarded(scope, receive), send)

    def _guarded(self, scope: Scope, receive: Receive) -> Receive:
        declared = dict(scope["headers"]).get(b"content-length")
        received, deadline, finished = 0, None, False

        async def guarded_receive() -> Message:
            nonlocal received, deadline, finished
            if finished:  # the body is in: what follows is the disconnect, however long it takes
                return await receive()
            if declared is not None and not declared.strip().isdigit():
                raise BadContentLength()
            if declared is not None and int(declared) > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            deadline = deadline or time.monotonic() + self.read_timeout_s
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                raise ReadTimeout(self.read_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                finished = not message.get("more_body", False)
            return message

        return guarded_receive
