"""Model results → response JSON (top-k lists, attention PNGs) and the audit record. Runs in the decode pool
because PNG encoding is CPU work that must stay off the event loop."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .codec import png_base64, resize_mask
from .state import Classified


def top_k(scores: np.ndarray, class_names: list[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"index": int(i), "label": class_names[i], "score": float(scores[i])} for i in order]


def attention_entries(masks: dict[str, np.ndarray], original: tuple[int, int] | None) -> list[dict[str, Any]]:
    """One entry per module at its own resolution; with ``original`` = (w, h) also the map resized to it."""
    entries = []
    for module, mask in masks.items():
        entry: dict[str, Any] = {"module": module, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                                 "png": png_base64(mask)}
        if original is not None:
            w, h = original
            entry["original"] = {"height": h, "width": w, "png": png_base64(resize_mask(mask, w, h))}
        entries.append(entry)
    return entries


def predictions(done: Classified, *, k: int, attention: bool, original_size: bool) -> list[dict[str, Any]]:
    out = []
    for image, result in zip(done.images, done.results, strict=True):
        item: dict[str, Any] = {"top_k": top_k(result.scores, done.model.meta.class_names, k)}
        if attention:
            item["attention"] = attention_entries(result.masks or {},
                                                  (image.width, image.height) if original_size else None)
        out.append(item)
    return out


def audit_record(done: Classified, preds: list[dict[str, Any]], *, route: str, started: float) -> dict[str, Any]:
    images = []
    for image, pred in zip(done.images, preds, strict=True):
        entry = {"sha256": image.sha256, "bytes": image.nbytes, "width": image.width, "height": image.height,
                 "top_k": pred["top_k"]}
        if "attention" in pred:
            entry["attention"] = pred["attention"]
        images.append(entry)
    model = {"name": done.model.name, "version": done.model.meta.version, "precision": done.model.precision}
    return {"id": done.id, "created_at": time.time(), "model": model,
            "route": route, "latency_ms": round(1000 * (time.perf_counter() - started), 3), "images": images}
