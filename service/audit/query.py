"""Search filters, opaque keyset cursors and the SQL that both backends run for a page.

Pages are ordered newest first by ``(created_at, id)`` and continue from the last key seen (keyset pagination),
so records written while a client pages never shift or repeat the pages it has not read yet. A search with an
image-level filter (``label``, ``min_score``, ``max_score``, ``familiar``) runs on ``prediction_images`` (one
row per image, with the prediction's time and model copied in, so one index serves filter and order); any other
search runs on ``predictions``. SQL uses ``?`` placeholders; the PostgreSQL backend translates them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from .interface import InvalidQuery

MAX_LIMIT = 500
MAX_IMAGE_INDEX = 10_000  # far above any request's image count; keeps an image index a small integer for the store
DEFAULT_LIMIT = 50


@dataclass(frozen=True)
class Filters:
    """What a search selects; every field is optional. ``label``, ``min_score``, ``max_score`` and ``familiar``
    must hold for one and the same image (its top-1, its unfamiliar-input flag: an image of a model without a
    detector has no flag and matches neither True nor False); ``since`` is inclusive, ``until`` exclusive (epoch
    seconds)."""

    model: str | None = None
    version: str | None = None
    label: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    familiar: bool | None = None
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_score", "max_score", "since", "until"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidQuery(f"{name} must be a finite number")

    @property
    def image_level(self) -> bool:
        return any(value is not None for value in (self.label, self.min_score, self.max_score, self.familiar))


def parse_time(text: str, name: str) -> float:
    """ISO 8601 (``2026-12-01T10:00:00Z``, ``2026-12-01``; no zone means UTC) or epoch seconds → epoch seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise InvalidQuery(f"{name} must be a finite time")
        return value
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidQuery(f"{name} must be ISO 8601 (2026-12-01T10:00:00Z) or epoch seconds, "
                           f"got {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_bool(text: str, name: str) -> bool:
    """``true`` / ``false`` (any case) → bool; anything else is an :class:`InvalidQuery` naming the parameter."""
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise InvalidQuery(f"{name} must be true or false, got {text[:40]!r}")
    return value == "true"


def encode_cursor(created_at: float, prediction_id: str) -> str:
    raw = json.dumps([created_at, prediction_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) key a cursor continues after; :class:`InvalidQuery` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, prediction_id = json.loads(raw)
        if isinstance(created_at, bool) or not isinstance(created_at, int | float) or not isinstance(
                prediction_id, str):
            raise ValueError
        return float(created_at), prediction_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidQuery("cursor is not one this service gave out (pass next_cursor back unchanged)") from None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def page_sql(filters: Filters, after: tuple[float, str] | None, limit: int) -> tuple[str, list]:
    """``SELECT created_at, id`` of the next ``limit`` matching predictions, newest first."""
    if filters.image_level:
        table, key = "prediction_images", "prediction_id"
        model, version = "model_name", "model_version"
    else:
        table, key = "predictions", "id"
        model, version = "model_name", "model_version"
    clauses: list[str] = []
    params: list = []

    def where(clause: str, *values) -> None:
        clauses.append(clause)
        params.extend(values)

    if filters.model is not None:
        where(f"{model} = ?", filters.model)
    if filters.version is not None:
        where(f"{version} = ?", filters.version)
    if filters.label is not None:
        where("label = ?", filters.label)
    if filters.min_score is not None:
        where("score >= ?", filters.min_score)
    if filters.max_score is not None:
        where("score <= ?", filters.max_score)
    if filters.familiar is not None:
        where("familiar = ?", filters.familiar)
    if filters.since is not None:
        where("created_at >= ?", filters.since)
    if filters.until is not None:
        where("created_at < ?", filters.until)
    if after is not None:
        where(f"(created_at, {key}) < (?, ?)", *after)
    distinct = "DISTINCT " if filters.image_level else ""
    sql = (f"SELECT {distinct}created_at, {key} FROM {table}"
           + (" WHERE " + " AND ".join(clauses) if clauses else "")
           + f" ORDER BY created_at DESC, {key} DESC LIMIT ?")
    return sql, [*params, limit]


def in_list(count: int) -> str:
    return "(" + ", ".join("?" * count) + ")"
