"""The one error table: every failure that leaves the service, its HTTP status, its stable code and the reason it is
counted under in ``macula_rejections_total``; and the one handler that answers (and counts) them all.

The batcher, the codec, the request readers and the service core raise their own exceptions and know nothing of
HTTP; :data:`ERRORS` maps each of them here. Routes may raise :class:`ServiceError` with a code from
:data:`CODES`. FastAPI's validation errors, Starlette's (unknown route, wrong method) and anything unexpected go
through the same handler, so every error body is ``{"detail": str, "code": str}`` and every client-caused one is
counted exactly once. :func:`responses` declares the same model in the OpenAPI schema.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import batching, codec, inputs, limits, masks, overlay, state
from .audit import interface as audit
from .metrics import Metrics

log = logging.getLogger("service")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away before the answer": logged, never sent


@dataclass(frozen=True)
class Rule:
    status: int
    reason: str | None  # the macula_rejections_total reason; None: not the client's doing (a 500)
    retry_after: bool = False


CODES: dict[str, Rule] = {
    "bad_request": Rule(400, "bad_input"),
    "unauthorized": Rule(401, "unauthorized"),
    "not_found": Rule(404, "not_found"),
    "model_not_found": Rule(404, "not_found"),
    "prediction_not_found": Rule(404, "not_found"),
    "mask_not_found": Rule(404, "not_found"),
    "image_not_found": Rule(404, "not_found"),
    "method_not_allowed": Rule(405, "bad_input"),
    "request_timeout": Rule(408, "read_timeout"),
    "body_too_large": Rule(413, "too_large"),
    "image_too_large": Rule(413, "too_large"),
    "response_too_large": Rule(413, "too_large"),
    "unsupported_media_type": Rule(415, "unsupported_format"),
    "invalid_parameter": Rule(422, "bad_input"),
    "undecodable_image": Rule(422, "bad_input"),
    "client_gone": Rule(CLIENT_CLOSED_REQUEST, "client_gone"),
    "internal_error": Rule(500, None),
    "overloaded": Rule(503, "overload", retry_after=True),
    "not_ready": Rule(503, "not_ready", retry_after=True),
    "audit_unavailable": Rule(503, None, retry_after=True),   # the store's fault, not the client's
    "deadline_exceeded": Rule(504, "timeout"),
}

ERRORS: dict[type[Exception], str] = {
    inputs.MalformedRequest: "bad_request",
    inputs.WrongContentType: "unsupported_media_type",
    inputs.TooManyImages: "body_too_large",
    limits.BodyTooLarge: "body_too_large",
    limits.BadContentLength: "bad_request",
    limits.ReadTimeout: "request_timeout",
    codec.EmptyImage: "bad_request",
    codec.UnsupportedFormat: "unsupported_media_type",
    codec.ImageTooLarge: "image_too_large",
    codec.UndecodableImage: "undecodable_image",
    batching.QueueFull: "overloaded",
    batching.DeadlineExceeded: "deadline_exceeded",
    batching.InferenceFailed: "internal_error",
    batching.Unavailable: "not_ready",
    state.ModelNotFound: "model_not_found",
    state.InvalidParameter: "invalid_parameter",
    masks.UnknownModule: "invalid_parameter",
    state.NotReady: "not_ready",
    state.MasksTooLarge: "response_too_large",
    state.ClientGone: "client_gone",
    overlay.MaskNotFound: "mask_not_found",
    overlay.OverlayError: "invalid_parameter",
    audit.StoreUnavailable: "audit_unavailable",
    audit.InvalidQuery: "invalid_parameter",
}

FASTAPI_DEFAULTS = (http_exception_handler, request_validation_exception_handler)  # the handlers we replace
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
               415: "unsupported_media_type", 422: "invalid_parameter"}


class ServiceError(Exception):
    """An error raised by route code: ``code`` is one of :data:`CODES` (``status`` must agree with it)."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        if CODES[code].status != status:
            raise ValueError(f"error code {code!r} is status {CODES[code].status}, not {status}")
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class ErrorBody(BaseModel):
    """Every error response."""

    detail: str
    code: str


def error_response(code: str, detail: str, headers: dict[str, str] | None = None, *,
                   extra: dict[str, Any] | None = None) -> JSONResponse:
    """The error body ``{"detail", "code"}`` (plus ``extra`` fields, e.g. readiness's ``reason``)."""
    rule = CODES[code]
    if rule.retry_after:
        headers = {"Retry-After": "1", **(headers or {})}
    return JSONResponse({"detail": detail, "code": code, **(extra or {})}, status_code=rule.status, headers=headers)


def classify(exc: BaseException) -> tuple[str, str, dict[str, str] | None]:
    """(code, detail, headers) for any exception: the table, FastAPI's and Starlette's errors, else a 500."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.detail, exc.headers
    if isinstance(exc, RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return "invalid_parameter", problems or "invalid parameter", None
    if isinstance(exc, StarletteHTTPException) and exc.status_code < 500:  # any other 4xx of the framework: 400
        code = _HTTP_CODES.get(exc.status_code, "bad_request")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return code, detail, getattr(exc, "headers", None)
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls], str(exc), None
    return "internal_error", "internal error; the failure was logged on the server", None


class ErrorHandler:
    """The one exception handler: answers ``{"detail", "code"}`` and counts each client-caused error once."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def count(self, exc: BaseException) -> tuple[str, str, dict[str, str] | None]:
        """Count ``exc`` as a rejection if a client caused it; returns its (code, detail, headers)."""
        code, detail, headers = classify(exc)
        reason = CODES[code].reason
        if reason is not None:
            self.metrics.reject(reason)
        return code, detail, headers

    def respond(self, exc: BaseException) -> JSONResponse:
        return error_response(*self.count(exc))

    async def __call__(self, request: Request, exc: Exception) -> JSONResponse:
        response = self.respond(exc)
        if response.status_code == 405:  # Starlette names one route's methods; a path may have several routes
            methods = allowed_methods(request)
            if methods:
                response.headers["Allow"] = ", ".join(methods)
        return response


def allowed_methods(request: Request) -> list[str]:
    """Every method the OpenAPI schema lists for this request's path."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(request.url.path):
            methods.update(method.upper() for method in operations)
    return sorted(methods)


class LastResort:
    """Pure ASGI middleware just outside FastAPI's exception handling: an exception nothing else handled is logged
    once and answered as a JSON 500 on a connection that stays open (Starlette's own last resort re-raises, and
    uvicorn then answers plain text or drops the keep-alive connection)."""

    def __init__(self, app: ASGIApp, handler: ErrorHandler) -> None:
        self.app, self.handler = app, handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started or scope["type"] != "http":
                raise
            log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await self.handler.respond(exc)(scope, receive, send)


def install(app: FastAPI, metrics: Metrics) -> ErrorHandler:
    """Register the one handler for every exception the table knows and FastAPI's and Starlette's own; anything
    else is answered by :class:`LastResort` with the same handler."""
    handler = ErrorHandler(metrics)
    for cls in (ServiceError, RequestValidationError, StarletteHTTPException, *ERRORS):
        if app.exception_handlers.get(cls, FASTAPI_DEFAULTS[0]) not in FASTAPI_DEFAULTS:
            raise RuntimeError(f"an exception handler for {cls.__name__} is already installed")
        app.add_exception_handler(cls, handler)
    app.add_middleware(LastResort, handler=handler)
    return handler


_DESCRIPTIONS = {400: "Malformed request", 401: "Missing or wrong API key", 404: "Unknown model, prediction or route",
                 408: "The request did not arrive in time", 413: "Body, image count, image or answer too large",
                 415: "Not an accepted image format or Content-Type", 422: "Invalid parameter or undecodable image",
                 500: "Internal error (never caused by what a client sent)",
                 503: "Overloaded, not ready, or the audit store unavailable (with Retry-After)",
                 504: "Deadline passed before the answer"}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the real error model."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}
