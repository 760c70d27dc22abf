"""The FastAPI app: ``create_app(settings)`` builds it; its lifespan loads, warms up, serves, drains.

Middleware, outermost first: request metrics (count, latency, in-flight), body size limit. The API key is a
dependency of every router but health/metrics; errors all leave as ``{"detail", "code"}`` (errors.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import require_api_key
from .codec import treat_bomb_warnings_as_errors
from .errors import REJECTION_REASONS, ServiceError, error_response, install_handlers
from .limits import BodySizeLimit
from .metrics import Metrics
from .routers import audit, audit_page, docs, health, models, predict, torchserve
from .settings import Settings
from .state import ClientGone, Service

log = logging.getLogger("service")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away before the answer": logged, never sent


class RequestMetrics:
    """Pure ASGI middleware: macula_requests_total / request_duration_seconds by route template, in-flight."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, start = 500, time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.metrics.track_inflight():
            try:
                await self.app(scope, receive, recording_send)
            finally:
                route = scope.get("route")
                self.metrics.observe_request(getattr(route, "path", None), scope["method"], status,
                                             time.perf_counter() - start)


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    return lifespan


def _add_error_metrics(app: FastAPI, service: Service) -> None:
    """Count client-caused errors as rejections by reason, and answer vanished clients without noise."""

    async def service_error(request: Request, exc: ServiceError):
        reason = REJECTION_REASONS.get(exc.code)
        if reason is not None:
            service.metrics.reject(reason)
        return exc.response()

    async def client_gone(request: Request, exc: ClientGone):
        service.metrics.reject("client_gone")
        return error_response(CLIENT_CLOSED_REQUEST, "client_gone", "client closed the request")

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ClientGone, client_gone)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` default to the environment (``MACULA_*``), read now, not at import."""
    settings = settings or Settings()
    treat_bomb_warnings_as_errors()
    metrics = Metrics()
    service = Service(settings, metrics)
    app = FastAPI(title="Macula", version="0.1.0", lifespan=_lifespan(service), docs_url=None, redoc_url=None,
                  description="Image classification with BAM/CBAM attention masks, dynamic batching and an audit "
                              "trail. Errors are {\"detail\", \"code\"}; see docs/api.md.")
    app.state.service = service
    install_handlers(app)
    _add_error_metrics(app, service)
    secured = [Depends(require_api_key)]
    app.include_router(health.router)
    docs.install(app)
    for router in (models.router, predict.router, audit.router, torchserve.router):
        app.include_router(router, dependencies=secured)
    audit_page.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, on_reject=metrics.reject)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
