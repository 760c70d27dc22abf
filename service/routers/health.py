"""Liveness, readiness and metrics: always open (no API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from ..deps import ServiceDep
from ..errors import error_response, responses
from ..state import NotReady

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 while the process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="200 once every model is loaded and warmed up; 503 while starting or draining",
            responses=responses(503))
async def readyz(request: Request, service: ServiceDep) -> Any:
    """503 ``not_ready`` with ``reason``: ``loading``, ``warming up``, ``starting``, ``restarting`` (the inference
    worker died and is being replaced), ``failed`` (the start failed; the server exits) or ``draining``."""
    if not service.accepting:
        reason, detail = service.not_ready_reason()
        code, detail, headers = request.app.state.error_handler.count(NotReady(detail, reason))
        return error_response(code, detail, headers, extra={"reason": reason})
    return {"status": "ready", "models": list(service.runners), "default_model": service.default_model}


@router.get("/metrics", summary="Prometheus text format", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=None, headers={"Content-Type": content_type})
