"""POST /v1/models/{name}/predict and /v1/predict (the default model): parse the request, call
:meth:`Service.predict`, answer ``{"id", "model", "predictions"}``."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from ..deps import ServiceDep, wait_disconnect
from ..errors import responses
from ..inputs import read_images
from ..masks import select_modules
from ..state import InvalidParameter
from .query import refuse_unknown

PARAMETERS = ("top_k", "attention", "attention_size", "modules")
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "minItems": 1,
                   "items": {"type": "string", "description": "base64 or data: URI"}}}}},
}}}
PREDICT_ERRORS = responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504)


async def strict_query(request: Request) -> None:
    """Refuse a query parameter these routes do not take, one given twice (:mod:`.query`), or a ``top_k`` that is
    not a plain integer (``3.0``; pydantic alone would accept it)."""
    refuse_unknown(request, PARAMETERS)
    top_k = request.query_params.get("top_k")
    if top_k is not None and not (top_k.isascii() and top_k.isdigit()):
        raise InvalidParameter(f"top_k must be a whole number, got {top_k!r}")


router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[Depends(strict_query)])

TopK = Annotated[int | None, Query(ge=1, description="how many classes to return, 1..num_classes (default 5, or "
                                                     "all if fewer)")]
Attention = Annotated[bool, Query(description="also return each attention module's spatial map as a PNG")]
AttentionSize = Annotated[Literal["feature", "original"], Query(
    description="'original': each map also resized to the input image's size (longer side capped)")]
Modules = Annotated[str | None, Query(description="comma-separated attention module names (GET /v1/models/{name} "
                                                  "lists them): return only their masks; implies attention=true")]


def module_list(modules: str | None) -> list[str] | None:
    """``"layer1.0.cbam,layer2.0.cbam"`` → the names; an empty name is refused."""
    if modules is None:
        return None
    names = [name.strip() for name in modules.split(",")]
    if not all(names):
        raise InvalidParameter(f"modules must be comma-separated attention module names, got {modules!r}")
    return names


async def _predict(request: Request, service: ServiceDep, name: str | None, *, top_k: int | None, attention: bool,
                   attention_size: str, modules: str | None, route: str) -> dict[str, Any]:
    settings = service.settings
    service.check_accepting()
    selected = select_modules(service.runner(name), module_list(modules))  # 404, 422 before the body is read
    blobs = await read_images(request, field="file", max_images=settings.max_images_per_request,
                              max_bytes=settings.max_body_bytes, max_depth=settings.json_max_depth)
    done = await service.predict(name, blobs, route=route, top_k=top_k, attention=attention,
                                 original_size=attention_size == "original", modules=selected,
                                 until_gone=partial(wait_disconnect, request))
    return {"id": done.id, "model": {"name": done.model.name, "version": done.model.meta.version},
            "predictions": done.items}


@router.post("/models/{name}/predict", summary="Classify images with a named model", openapi_extra=IMAGE_BODY,
             responses=PREDICT_ERRORS)
async def predict_named(request: Request, service: ServiceDep, name: str, top_k: TopK = None,
                        attention: Attention = False, attention_size: AttentionSize = "feature",
                        modules: Modules = None) -> dict[str, Any]:
    return await _predict(request, service, name, top_k=top_k, attention=attention, attention_size=attention_size,
                          modules=modules, route="/v1/models/{name}/predict")


@router.post("/predict", summary="Classify images with the default model", openapi_extra=IMAGE_BODY,
             responses=PREDICT_ERRORS)
async def predict_default(request: Request, service: ServiceDep, top_k: TopK = None, attention: Attention = False,
                          attention_size: AttentionSize = "feature", modules: Modules = None) -> dict[str, Any]:
    return await _predict(request, service, None, top_k=top_k, attention=attention, attention_size=attention_size,
                          modules=modules, route="/v1/predict")
