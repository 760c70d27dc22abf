"""The Open Inference Protocol (KServe v2, Triton's HTTP API): health, metadata and inference under ``/v2``.

Inference goes through :meth:`Service.predict` like every other route (same batcher, limits, deadline and audit
record); this module only reads the protocol's request (service/oip.py, off the event loop) and writes its answer.
Every error of these routes is the protocol's ``{"error": "..."}`` with the status, ``Retry-After`` and rejection
count the one error table (errors.py) gives it. ``/v2/health/*`` is open like ``/healthz``; the rest needs the API
key when one is set. Each model route also answers under ``/versions/{version}``, where the version must be the
served checkpoint's (sha256[:12]); any other is 404.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

from .. import oip
from ..deps import ServiceDep, service_of, wait_disconnect
from ..errors import CODES, classify
from ..inference import ModelRunner
from ..state import ModelNotFound, Prediction, Service

log = logging.getLogger("service")
SERVER_NAME = "macula"
PLATFORM = "macula_pytorch"  # not one of the protocol's listed platforms: an eager PyTorch attention CNN


class ProtocolErrorBody(BaseModel):
    """The protocol's error object."""

    error: str


class ProtocolRoute(APIRoute):
    """A route whose every failure (dependencies and validation included) is answered ``{"error": "..."}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_in_protocol_form(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                return protocol_error(request, exc)

        return handle_in_protocol_form


def protocol_error(request: Request, exc: Exception) -> JSONResponse:
    """``exc`` as the protocol's error body, with the error table's status and headers; counted like any other."""
    code, detail, headers = classify(exc)
    rule = CODES[code]
    if rule.reason is None:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    else:
        service_of(request).metrics.reject(rule.reason)
    if rule.retry_after:
        headers = {"Retry-After": "1", **(headers or {})}
    return JSONResponse({"error": detail}, status_code=rule.status, headers=headers)


_DESCRIPTIONS = {400: "Not a valid inference request", 401: "Missing or wrong API key",
                 404: "Unknown model or version", 408: "The request did not arrive in time",
                 413: "Body, image count or image too large", 415: "Not an accepted image format or encoding",
                 422: "Invalid parameter or undecodable image", 500: "Internal error (never caused by the request)",
                 503: "Overloaded or not ready (with Retry-After)", 504: "Deadline passed before the answer"}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ProtocolErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}


_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_PARAMETERS = {"type": "object", "additionalProperties": _SCALAR}
_SHAPE = {"type": "array", "items": {"type": "integer"}}
_TENSOR_META = {"type": "object", "required": ["name", "datatype", "shape"],
                "properties": {"name": {"type": "string"}, "datatype": {"type": "string"}, "shape": _SHAPE}}
_IMAGES_INPUT = {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
    "name": {"const": oip.INPUT}, "datatype": {"const": "BYTES"}, "parameters": _PARAMETERS,
    "shape": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "integer", "minimum": 1}},
    "data": {"type": "array", "minItems": 1, "items": {"type": "string", "contentEncoding": "base64"}}}}
_REQUESTED_OUTPUT = {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS}}
_INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"}, "parameters": _PARAMETERS,
    "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _IMAGES_INPUT},
    "outputs": {"type": "array", "items": _REQUESTED_OUTPUT}}}
_INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
    "parameters": _PARAMETERS, "outputs": {"type": "array", "items": _TENSOR_META}}}
_BINARY = {"type": "string", "format": "binary", "description": "the JSON header, then the binary tensor data"}
INFER_OPENAPI = {
    "parameters": [{"name": oip.HEADER_LENGTH, "in": "header", "required": False,
                    "description": "binary data extension: the length of the JSON header that starts the body",
                    "schema": {"type": "integer", "minimum": 1}}],
    "requestBody": {"required": True, "content": {"application/json": {"schema": _INFER_REQUEST},
                                                  "application/octet-stream": {"schema": _BINARY}}},
    "responses": {"200": {"description": "The outputs", "content": {
        "application/json": {"schema": _INFER_RESPONSE}, "application/octet-stream": {"schema": _BINARY}}}},
}
INFER_ERRORS = _errors(400, 401, 404, 408, 413, 415, 422, 500, 503, 504)

health = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=ProtocolRoute)
router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=ProtocolRoute,
                   responses=_errors(401, 422))  # 422: declared so FastAPI adds no validation model


@health.get("/health/live", summary="Server live: 200 while the process is alive")
async def live() -> dict[str, bool]:
    return {"live": True}


@health.get("/health/ready", summary="Server ready: 200 once every model is loaded and warmed up, else 503",
            responses=_errors(503))
async def ready(service: ServiceDep) -> dict[str, bool]:
    service.check_accepting()
    return {"ready": True}


@router.get("", summary="Server metadata: name, version, protocol extensions")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": oip.EXTENSIONS}


def _runner(service: Service, name: str, version: str | None) -> ModelRunner:
    runner = service.runner(name)
    if version is not None and version != runner.meta.version:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it serves version {runner.meta.version}")
    return runner


def model_metadata(runner: ModelRunner) -> dict[str, Any]:
    """The protocol's model metadata: one BYTES input, ``probabilities``, one output per attention module and
    ``input_box`` (the region of each original image that the model saw)."""
    outputs = [{"name": oip.PROBABILITIES, "datatype": "FP32", "shape": [-1, runner.meta.num_classes]}]
    outputs += [{"name": module, "datatype": "UINT8", "shape": [-1, *runner.attention_sizes[module]]}
                for module in _modules(runner)]
    outputs.append({"name": oip.INPUT_BOX, "datatype": "INT32", "shape": [-1, 4]})
    return {"name": runner.name, "versions": [runner.meta.version], "platform": PLATFORM,
            "inputs": [{"name": oip.INPUT, "datatype": "BYTES", "shape": [-1]}], "outputs": outputs}


def _modules(runner: ModelRunner) -> list[str]:
    return list(runner.attention_modules) if runner.has_attention else []


@router.get("/models/{name}", summary="Model metadata", responses=_errors(404))
async def get_model_metadata(service: ServiceDep, name: str) -> dict[str, Any]:
    return model_metadata(_runner(service, name, None))


@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)", responses=_errors(404))
async def get_version_metadata(service: ServiceDep, name: str, version: str) -> dict[str, Any]:
    return model_metadata(_runner(service, name, version))


@router.get("/models/{name}/ready", summary="Model ready: 200 once loaded and warmed up, else 503",
            responses=_errors(404, 503))
async def model_ready(service: ServiceDep, name: str) -> dict[str, Any]:
    return _ready(service, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model ready (one version)",
            responses=_errors(404, 503))
async def version_ready(service: ServiceDep, name: str, version: str) -> dict[str, Any]:
    return _ready(service, name, version)


def _ready(service: Service, name: str, version: str | None) -> dict[str, Any]:
    service.check_accepting()
    return {"name": _runner(service, name, version).name, "ready": True}


@router.post("/models/{name}/infer", summary="Inference (JSON or binary tensor data)", openapi_extra=INFER_OPENAPI,
             responses=INFER_ERRORS, response_class=Response)
async def infer(request: Request, service: ServiceDep, name: str) -> Response:
    return await _infer(request, service, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference with one version",
             openapi_extra=INFER_OPENAPI, responses=INFER_ERRORS, response_class=Response)
async def infer_version(request: Request, service: ServiceDep, name: str, version: str) -> Response:
    return await _infer(request, service, name, version)


async def _infer(request: Request, service: Service, name: str, version: str | None) -> Response:
    """Read the request (off the loop), predict, answer in the forms asked for (off the loop)."""
    service.check_accepting()
    runner = _runner(service, name, version)  # 404 before the body is read
    length = oip.header_length(request.headers.get(oip.HEADER_LENGTH))
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    body = await request.body()
    parsed = await service.in_pool(_read, body, encoding, length, service.settings.max_body_bytes,
                                   service.settings.max_images_per_request)
    specs = oip.requested_outputs(parsed.header, _modules(runner), runner.meta.num_classes)
    done = await service.predict(name, parsed.images, route=request.scope["route"].path,
                                 attention=any(spec.name in _modules(runner) for spec in specs),
                                 until_gone=partial(wait_disconnect, request))
    answer = {"model_name": runner.name, "model_version": runner.meta.version, "parameters": {"prediction_id": done.id}}
    if parsed.header.id is not None:
        answer["id"] = parsed.header.id
    content, json_length = await service.in_pool(_answer, done, specs, answer)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={oip.HEADER_LENGTH: str(json_length)})


def _read(body: bytes, encoding: str, length: int | None, max_bytes: int, max_images: int) -> oip.InferRequest:
    if encoding != "identity":
        body = oip.decompress(body, encoding, max_bytes)
    return oip.parse_request(body, length, max_images=max_images)


def _answer(done: Prediction, specs: list[oip.OutputSpec], header: dict[str, Any]) -> tuple[bytes, int | None]:
    scores = np.stack([result.scores for result in done.results])
    masks = {spec.name: np.stack([result.masks[spec.name] for result in done.results])
             for spec in specs if spec.name not in (oip.PROBABILITIES, oip.INPUT_BOX)}
    boxes = np.array([image.input_box for image in done.images], dtype=np.int32).reshape(-1, 4)
    tensors = oip.output_tensors(specs, scores, masks, done.model.meta.class_names, boxes)
    return oip.encode_response(tensors, specs, header)
