"""A prediction's record → the rows the backends store, and the masks and summaries read back from them.

The whole record is kept as JSON (``predictions.record``); the columns beside it are what search filters on,
what summaries show and what retention counts: each image's top-1 label and score and its ``familiar`` flag
(``prediction_images``; NULL for a model without an unfamiliar-input detector), whether masks were kept, and
the bytes the record and its kept inputs take.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .interface import KeptInput


@dataclass(frozen=True)
class ImageRow:
    n: int
    label: str | None
    score: float | None
    input: KeptInput | None
    familiar: bool | None = None   # None: the model has no unfamiliar-input detector


@dataclass(frozen=True)
class EncodedRecord:
    """One record, ready for any backend's INSERTs."""

    id: str
    created_at: float
    model_name: str | None
    model_version: str | None
    route: str | None
    latency_ms: float | None
    masks_kept: bool
    nbytes: int
    record_json: str
    images: tuple[ImageRow, ...]

    def prediction_row(self) -> tuple:
        return (self.id, self.created_at, self.model_name, self.model_version, self.route, self.latency_ms,
                len(self.images), self.masks_kept, self.nbytes, self.record_json)

    def image_rows(self) -> list[tuple]:
        return [(self.id, img.n, self.created_at, self.model_name, self.model_version, img.label, img.score,
                 img.input is not None, img.familiar) for img in self.images]

    def input_rows(self) -> list[tuple]:
        return [(self.id, img.n, img.input.kind, img.input.media_type, img.input.data)
                for img in self.images if img.input is not None]


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _top1(image: Any) -> tuple[str | None, float | None]:
    top = image.get("top_k") if isinstance(image, dict) else None
    if not isinstance(top, list) or not top or not isinstance(top[0], dict):
        return None, None
    score = top[0].get("score")
    score = float(score) if isinstance(score, int | float) and math.isfinite(score) else None
    return _text(top[0].get("label")), score


def _familiar(image: Any) -> bool | None:
    flag = image.get("familiar") if isinstance(image, dict) else None
    return flag if isinstance(flag, bool) else None


def encode(record: dict[str, Any], inputs: Sequence[KeptInput | None], now: float) -> EncodedRecord:
    """The rows of one record; ``inputs[n]`` is image n's kept input (or None). Raises ValueError/TypeError for
    something that is not a storable record. An image whose input was kept gets an ``input`` entry saying so."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
        raise ValueError("an audit record is a dict with a non-empty string 'id'")
    images = record.get("images") or []
    if not isinstance(images, list):
        raise ValueError("'images' of an audit record must be a list")
    if any(kept is not None for kept in inputs):
        record = {**record, "images": [_mark_input(image, inputs[n] if n < len(inputs) else None)
                                       for n, image in enumerate(images)]}
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    created_at = float(record.get("created_at", now))
    latency = record.get("latency_ms")
    text = json.dumps(record, separators=(",", ":"), allow_nan=False)
    rows = []
    for n, image in enumerate(images):
        label, score = _top1(image)
        rows.append(ImageRow(n, label, score, inputs[n] if n < len(inputs) else None, _familiar(image)))
    masks = any(isinstance(image, dict) and image.get("attention") for image in images)
    nbytes = len(text) + sum(len(row.input.data) for row in rows if row.input is not None)
    return EncodedRecord(record["id"], created_at, _text(model.get("name")), _text(model.get("version")),
                         _text(record.get("route")), None if latency is None else float(latency), masks, nbytes,
                         text, tuple(rows))


def _mark_input(image: Any, kept: KeptInput | None) -> Any:
    if kept is None or not isinstance(image, dict):
        return image
    return {**image, "input": {"kept": kept.kind, "media_type": kept.media_type, "bytes": len(kept.data)}}


def mask_png(record: dict[str, Any], n: int, module: str, *, size: str = "feature") -> bytes | None:
    """The PNG of one module's spatial mask for image ``n`` of a record (``size="original"``: the copy resized to
    the input, where the record has one), or ``None`` when the record holds no such mask."""
    images = record.get("images") or []
    if not 0 <= n < len(images):
        return None
    for entry in images[n].get("attention") or []:
        if entry.get("module") == module:
            source = entry.get("original") if size == "original" else entry
            if not source or "png" not in source:
                return None
            try:
                return base64.b64decode(source["png"], validate=True)
            except (binascii.Error, ValueError):
                return None
    return None


def mask_modules(record: dict[str, Any], n: int) -> list[str]:
    """The modules whose masks a record holds for image ``n``, in network order."""
    images = record.get("images") or []
    if not 0 <= n < len(images):
        return []
    return [entry["module"] for entry in images[n].get("attention") or [] if "module" in entry]
