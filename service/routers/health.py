"""Liveness, readiness and metrics: always open (no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..errors import not_ready

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 while the process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="200 once every model is loaded and warmed up; 503 while starting or draining")
async def readyz(request: Request) -> dict:
    service = request.app.state.service
    if not service.accepting:
        raise not_ready("draining" if service.draining else "loading models")
    return {"status": "ready", "models": list(service.runners), "default_model": service.default_model}


@router.get("/metrics", summary="Prometheus text format")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.service.metrics.render()
    return Response(body, media_type=None, headers={"Content-Type": content_type})
