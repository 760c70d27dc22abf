"""POST /v1/models/{name}/predict and /v1/predict (the default model)."""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from .. import formatting
from ..errors import invalid_parameter
from ..inputs import read_images

PARAMETERS = ("top_k", "attention", "attention_size")


def strict_query(request: Request) -> None:
    """Refuse, by name, a query parameter these routes do not take (``?topk=3`` must not be silently ignored), one
    given twice, or a ``top_k`` that is not a plain integer (``3.0``; pydantic alone would accept it)."""
    names = [name for name, _ in request.query_params.multi_items()]
    for name in names:
        if name not in PARAMETERS:
            raise invalid_parameter(f"unknown query parameter {name!r}; this route takes {', '.join(PARAMETERS)}")
        if names.count(name) > 1:
            raise invalid_parameter(f"query parameter {name!r} is given more than once")
    top_k = request.query_params.get("top_k")
    if top_k is not None and not (top_k.isascii() and top_k.isdigit()):
        raise invalid_parameter(f"top_k must be a whole number, got {top_k!r}")


router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[Depends(strict_query)])

IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "description": "base64 or data: URI"}}}}},
}}}

TopK = Query(None, description="how many classes to return, 1..num_classes (default 5, or all if fewer)")
Attention = Query(False, description="also return each attention module's spatial map as a PNG")
AttentionSize = Query("feature", description="'original': each map also resized to the input image's size")


async def predict_images(request: Request, name: str | None, *, top_k: int | None, attention: bool,
                         attention_size: str, route: str) -> dict[str, Any]:
    """The predict flow shared by both routes: validate, read, classify, format, audit."""
    started = time.perf_counter()
    service = request.app.state.service
    service.check_accepting()
    runner = service.runner(name)
    top_k = min(5, runner.meta.num_classes) if top_k is None else top_k
    if not 1 <= top_k <= runner.meta.num_classes:
        raise invalid_parameter(f"top_k must be between 1 and {runner.meta.num_classes}, got {top_k}")
    settings = service.settings
    blobs = await read_images(request, field="file", max_images=settings.max_images_per_request,
                              max_bytes=settings.max_body_bytes)
    done = await service.classify(request, runner, blobs, attention=attention)
    format_ = partial(formatting.predictions, done, k=top_k, attention=attention,
                      original_size=attention_size == "original")
    preds = await service.in_pool(format_) if attention else format_()  # PNG encoding stays off the event loop
    service.audit.submit(formatting.audit_record(done, preds, route=route, started=started))
    return {"id": done.id, "model": {"name": runner.name, "version": runner.meta.version}, "predictions": preds}


@router.post("/models/{name}/predict", summary="Classify images with a named model", openapi_extra=IMAGE_BODY)
async def predict_named(request: Request, name: str, top_k: int | None = TopK, attention: bool = Attention,
                        attention_size: Literal["feature", "original"] = AttentionSize) -> dict[str, Any]:
    return await predict_images(request, name, top_k=top_k, attention=attention, attention_size=attention_size,
                                route="/v1/models/{name}/predict")


@router.post("/predict", summary="Classify images with the default model", openapi_extra=IMAGE_BODY)
async def predict_default(request: Request, top_k: int | None = TopK, attention: bool = Attention,
                          attention_size: Literal["feature", "original"] = AttentionSize) -> dict[str, Any]:
    return await predict_images(request, None, top_k=top_k, attention=attention, attention_size=attention_size,
                                route="/v1/predict")
