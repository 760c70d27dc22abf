"""Liveness, readiness and metrics: always open (no API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from ..errors import responses
from ..state import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 while the process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="200 once every model is loaded and warmed up; 503 while starting or draining",
            responses=responses(503))
async def readyz(service: ServiceDep) -> dict[str, Any]:
    service.check_accepting()
    return {"status": "ready", "models": list(service.runners), "default_model": service.default_model}


@router.get("/metrics", summary="Prometheus text format", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=None, headers={"Content-Type": content_type})
