"""Every error leaves the service as ``{"detail": "...", "code": "stable_snake_case"}``.

Route code raises :class:`ServiceError` (or one of the named subclasses); :func:`install_handlers` maps it,
FastAPI's validation errors, Starlette's HTTP errors (unknown route, wrong method) and anything unexpected
(500, internals never echoed) onto that body.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("service")

# rejection reason (macula_rejections_total{reason}) for each error code that a client caused
REJECTION_REASONS = {
    "bad_request": "bad_input", "invalid_parameter": "bad_input", "undecodable_image": "bad_input",
    "body_too_large": "too_large", "image_too_large": "too_large", "unsupported_media_type": "unsupported_format",
    "unauthorized": "unauthorized", "model_not_found": "not_found", "prediction_not_found": "not_found",
    "overloaded": "overload", "deadline_exceeded": "timeout",
}


class ServiceError(Exception):
    """An error with an HTTP status, a stable code and a message meant for the client."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.detail, self.headers)


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def bad_request(detail: str) -> ServiceError:
    return ServiceError(400, "bad_request", detail)


def invalid_parameter(detail: str) -> ServiceError:
    return ServiceError(422, "invalid_parameter", detail)


def undecodable(detail: str) -> ServiceError:
    return ServiceError(422, "undecodable_image", detail)


def unsupported(detail: str) -> ServiceError:
    return ServiceError(415, "unsupported_media_type", detail)


def image_too_large(detail: str) -> ServiceError:
    return ServiceError(413, "image_too_large", detail)


def too_many_images(detail: str) -> ServiceError:
    return ServiceError(413, "body_too_large", detail)


def overloaded(detail: str, retry_after_s: int = 1) -> ServiceError:
    return ServiceError(503, "overloaded", detail, {"Retry-After": str(retry_after_s)})


def not_ready(detail: str = "the service is not ready (starting up or shutting down)") -> ServiceError:
    return ServiceError(503, "not_ready", detail, {"Retry-After": "1"})


def deadline_exceeded(timeout_s: float) -> ServiceError:
    return ServiceError(504, "deadline_exceeded", f"the request waited more than {timeout_s:g} s in the queue")


def internal_error() -> ServiceError:
    return ServiceError(500, "internal_error", "internal error; the failure was logged on the server")


class BodyTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "body_too_large", f"request body larger than {limit} bytes")


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_parameter"}


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
    return error_response(422, "invalid_parameter", problems or "invalid parameter")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code >= 500:
        code, detail = "internal_error", "internal error"
    return error_response(exc.status_code, code, detail, getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return internal_error().response()


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
