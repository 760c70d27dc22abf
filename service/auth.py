"""Optional API key (``MACULA_API_KEY``): ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

A FastAPI dependency on every router except health and metrics; keys compared in constant time.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .deps import ServiceDep
from .errors import ServiceError


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


async def require_api_key(request: Request, service: ServiceDep) -> None:
    expected = service.settings.api_key
    if expected is None or not expected.get_secret_value():
        return
    key = presented_key(request)
    if key is None or not hmac.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise ServiceError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key> or "
                           "X-API-Key: <key>)", {"WWW-Authenticate": "Bearer"})
