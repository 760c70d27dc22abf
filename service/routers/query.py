"""Strict query strings: a route refuses, by name, a parameter it does not take (``?topk=3`` must not be silently
ignored, ``?lable=cat`` must not select everything) and one given twice, with 422 ``invalid_parameter``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, Request

from ..state import InvalidParameter


def refuse_unknown(request: Request, allowed: tuple[str, ...]) -> None:
    names = [name for name, _ in request.query_params.multi_items()]
    for name in names:
        if name not in allowed:
            raise InvalidParameter(f"unknown query parameter {name!r}; this route takes {', '.join(allowed)}")
        if names.count(name) > 1:
            raise InvalidParameter(f"query parameter {name!r} is given more than once")


def strict_query(*allowed: str) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that runs :func:`refuse_unknown` with these parameter names."""

    async def check(request: Request) -> None:
        refuse_unknown(request, allowed)

    return check


def strict(*allowed: str):
    """``Depends(strict_query(*allowed))``, for a route's ``dependencies=[...]``."""
    return Depends(strict_query(*allowed))
