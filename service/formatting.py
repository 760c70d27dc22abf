"""Model results → the per-image JSON of ``/v1`` predict (top-k lists, attention PNGs) and the audit record.

PNG encoding is CPU work: masks.py runs :func:`attention_entries` in the decode pool. Masks at the input image's size
(``attention_size=original``) are scaled down to at most ``max_side`` on their longer side (aspect kept), and
the service refuses a request whose original-size masks would exceed its byte budget before running it. Each
image's ``input_box`` (the region of the original the model saw, from the codec) goes into its entry; an
original-size mask covers that box and is 0 outside it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .codec import DecodedImage, place_mask, png_base64
from .inference import ImageResult, ModelRunner

if TYPE_CHECKING:
    from .state import Prediction

ORIGINAL_PNG_LEVEL = 1


def top_k(scores: np.ndarray, class_names: list[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"index": int(i), "label": class_names[i], "score": float(scores[i])} for i in order]


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled down, aspect kept, so that the longer side is at most ``max_side`` (never scaled up)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def attention_entries(masks: dict[str, np.ndarray], image: DecodedImage,
                      original: tuple[int, int] | None) -> list[dict[str, Any]]:
    """One entry per module at its own resolution; with ``original`` = (w, h) (the image's size, maybe scaled
    down) also the map placed over the image's ``input_box`` on a canvas of that size (0 outside the box), as a
    PNG at zlib level 1: three times faster than the default level on these smooth maps, for ~1.7× the bytes."""
    entries = []
    for module, mask in masks.items():
        entry: dict[str, Any] = {"module": module, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                                 "png": png_base64(mask)}
        if original is not None:
            w, h = original
            placed = place_mask(mask, image.input_box, (image.width, image.height), original)
            entry["original"] = {"height": h, "width": w, "png": png_base64(placed, ORIGINAL_PNG_LEVEL)}
        entries.append(entry)
    return entries


def predictions(runner: ModelRunner, images: list[DecodedImage], results: list[ImageResult], *, k: int,
                attention: bool) -> list[dict[str, Any]]:
    """The top-k and ``input_box`` of each image (and an empty attention list where asked for;
    masks.py fills it)."""
    items = []
    for image, result in zip(images, results, strict=True):
        item: dict[str, Any] = {"top_k": top_k(result.scores, runner.meta.class_names, k),
                                "input_box": list(image.input_box)}
        if result.familiar is not None:  # only for checkpoints that carry a detector
            item["familiar"], item["familiarity"] = result.familiar, round(result.familiarity, 4)
        if attention:
            item["attention"] = []
        items.append(item)
    return items


def audit_record(prediction: Prediction, *, route: str, started: float) -> dict[str, Any]:
    images = []
    for image, item in zip(prediction.images, prediction.items, strict=True):
        entry = {"sha256": image.sha256, "bytes": image.nbytes, "width": image.width, "height": image.height,
                 "input_box": list(image.input_box), "top_k": item["top_k"]}
        entry |= {key: item[key] for key in ("familiar", "familiarity") if key in item}
        if "attention" in item:
            entry["attention"] = item["attention"]
        images.append(entry)
    runner = prediction.model
    model = {"name": runner.name, "version": runner.meta.version, "precision": runner.precision}
    return {"id": prediction.id, "created_at": time.time(), "model": model,
            "route": route, "latency_ms": round(1000 * (time.perf_counter() - started), 3), "images": images}
