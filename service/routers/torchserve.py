"""TorchServe-compatible inference API: clients written for TorchServe work unchanged.

``POST /predictions/{name}``: raw image body or multipart field ``data`` → ``{label: score}`` for the top 5
(a list of such objects when several images were sent). ``POST /explanations/{name}``: the attention maps
(one list of ``{module, height, width, png, input_box}`` per image, ``input_box`` being the region of the
original image that the map covers; a single image gets its list directly). As in
TorchServe, a raw body needs no Content-Type (its bytes tell the format), and PUT works like POST: the curl
forms of TorchServe's docs (``curl URL -T kitten.jpg``, a PUT without Content-Type) run unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request

from ..deps import ServiceDep, wait_disconnect
from ..errors import responses
from ..inputs import read_images
from ..state import Prediction

router = APIRouter(tags=["torchserve"])
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
}}}
ERRORS = responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504)


async def _predict(request: Request, service: ServiceDep, name: str, *, attention: bool, route: str) -> Prediction:
    settings = service.settings
    service.check_accepting()
    service.runner(name)  # 404 before the body is read
    blobs = await read_images(request, field="data", max_images=settings.max_images_per_request,
                              max_bytes=settings.max_body_bytes, max_depth=settings.json_max_depth, sniff_untyped=True)
    return await service.predict(name, blobs, route=route, attention=attention,
                                 until_gone=partial(wait_disconnect, request))


def _one_or_list(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else items


@router.put("/predictions/{name}", summary="TorchServe-style prediction (PUT, as `curl URL -T file` sends it)",
            openapi_extra=IMAGE_BODY, responses=ERRORS)
@router.post("/predictions/{name}", summary="TorchServe-style prediction: {label: score} for the top 5",
             openapi_extra=IMAGE_BODY, responses=ERRORS)
async def predictions(request: Request, service: ServiceDep, name: str) -> Any:
    done = await _predict(request, service, name, attention=False, route="/predictions/{name}")
    return _one_or_list([{t["label"]: t["score"] for t in item["top_k"]} for item in done.items])


@router.put("/explanations/{name}", summary="TorchServe-style explanation (PUT, as `curl URL -T file` sends it)",
            openapi_extra=IMAGE_BODY, responses=ERRORS)
@router.post("/explanations/{name}", summary="TorchServe-style explanation: the attention maps",
             openapi_extra=IMAGE_BODY, responses=ERRORS)
async def explanations(request: Request, service: ServiceDep, name: str) -> Any:
    done = await _predict(request, service, name, attention=True, route="/explanations/{name}")
    return _one_or_list([[{**entry, "input_box": item["input_box"]} for entry in item["attention"]]
                         for item in done.items])
