"""What routes take from a request: the running service as a typed dependency, and the client's going away.

Every dependency here is ``async``: FastAPI runs a plain ``def`` one on a worker thread, a hop each request would
queue for on a busy machine (and a probe that waits too long gets its pod restarted)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .state import Service


def service_of(request: Request) -> Service:
    """The running service behind ``request``."""
    return request.app.state.service


async def get_service(request: Request) -> Service:
    """:func:`service_of` as a FastAPI dependency."""
    return service_of(request)


ServiceDep = Annotated[Service, Depends(get_service)]


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (once the body was read, the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
