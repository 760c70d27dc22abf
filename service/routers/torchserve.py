"""TorchServe-compatible inference API: clients written for TorchServe work unchanged.

``POST /predictions/{name}``: raw image body or multipart field ``data`` → ``{label: score}`` for the top 5
(a list of such objects when several images were sent). ``POST /explanations/{name}``: the attention maps
(one list of ``{module, height, width, png}`` per image; a single image gets its list directly). As in
TorchServe, a raw body needs no Content-Type (its bytes tell the format), and PUT works like POST: the curl
forms of TorchServe's docs (``curl URL -T kitten.jpg``, a PUT without Content-Type) run unchanged.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from fastapi import APIRouter, Request

from .. import formatting
from ..inputs import read_images

router = APIRouter(tags=["torchserve"])


async def _classify(request: Request, name: str, *, attention: bool, route: str):
    started = time.perf_counter()
    service = request.app.state.service
    service.check_accepting()
    runner = service.runner(name)
    settings = service.settings
    blobs = await read_images(request, field="data", max_images=settings.max_images_per_request,
                              max_bytes=settings.max_body_bytes, sniff_untyped=True)
    done = await service.classify(request, runner, blobs, attention=attention)
    format_ = partial(formatting.predictions, done, k=min(5, runner.meta.num_classes), attention=attention,
                      original_size=False)
    preds = await service.in_pool(format_) if attention else format_()  # PNG encoding stays off the event loop
    service.audit.submit(formatting.audit_record(done, preds, route=route, started=started))
    return preds


def _one_or_list(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else items


@router.put("/predictions/{name}", summary="TorchServe-style prediction (PUT, as `curl URL -T file` sends it)")
@router.post("/predictions/{name}", summary="TorchServe-style prediction: {label: score} for the top 5")
async def predictions(request: Request, name: str) -> Any:
    preds = await _classify(request, name, attention=False, route="/predictions/{name}")
    return _one_or_list([{t["label"]: t["score"] for t in p["top_k"]} for p in preds])


@router.put("/explanations/{name}", summary="TorchServe-style explanation (PUT, as `curl URL -T file` sends it)")
@router.post("/explanations/{name}", summary="TorchServe-style explanation: the attention maps")
async def explanations(request: Request, name: str) -> Any:
    preds = await _classify(request, name, attention=True, route="/explanations/{name}")
    return _one_or_list([p["attention"] for p in preds])
