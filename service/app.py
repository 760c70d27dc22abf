"""The FastAPI app: ``create_app(settings)`` builds it; its lifespan loads, warms up, serves, drains.

Middleware, outermost first: request metrics (count, latency, in-flight); the drain guard (a request that arrived
during the drain is refused; one still unanswered when the drain runs out gets JSON 503 ``not_ready``, never the
server's plain-text 500); the last-resort error handler; the body guard (size and read deadline). The API key is a
dependency of every router but health, metrics and the docs; every error leaves as ``{"detail", "code"}`` through
the one handler (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .audit import routes as audit
from .auth import require_api_key
from .codec import treat_bomb_warnings_as_errors
from .limits import BodyGuard
from .metrics import Metrics
from .routers import audit_page, docs, health, models, predict, torchserve, v2
from .settings import Settings
from .state import NotReady, Service


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


class DrainGuard:
    """Pure ASGI middleware: stamps each request as arrived before the drain or during it (:meth:`Drain.arrival`;
    routes refuse only the latter), and once the drain runs out (:meth:`Drain.deadline`) stops a request that has
    not started its answer and answers it JSON 503 ``not_ready`` while the server can still send it."""

    def __init__(self, app: ASGIApp, service: Service, respond) -> None:
        self.app, self.service, self.respond = app, service, respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        with self.service.drain.arrival():  # the task copies the stamp: routes may start it after the signal
            handling = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        with self.service.drain.deadline() as expiry:
            try:
                await asyncio.wait({handling, expiry}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not handling.done() and not started:
                    handling.cancel()
        if handling.done() and not handling.cancelled():
            handling.result()
            return
        if started:  # already answering: let it finish
            await handling
            return
        with contextlib.suppress(BaseException):
            await handling
        await self.respond(NotReady("shutting down: the drain timeout ran out before this request was answered; "
                                    "retry on another instance"))(scope, receive, send)


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.begin_start()  # in the background: the port opens now, /readyz answers 503 with the reason
        try:
            yield
        finally:
            await service.stop()

    return lifespan


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
    app.include_router(health.router)
    app.include_router(v2.health)
    docs.install(app)
    secured = [Depends(require_api_key)]
    for router in (models.router, predict.router, torchserve.router):
        app.include_router(router, dependencies=secured, responses=errors.responses(401, 422))
    app.include_router(audit.router, dependencies=secured, responses=errors.responses(400, 401, 404, 422, 503))
    app.include_router(v2.router, dependencies=secured)  # the Open Inference Protocol: errors are {"error": ...}
    audit_page.install(app, secured)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, read_timeout_s=settings.read_timeout_s)
    handler = app.state.error_handler = errors.install(app, metrics)
    app.add_middleware(DrainGuard, service=service, respond=handler.respond)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
