"""What every audit backend provides, the values that cross that boundary, and the store's own exceptions.

A backend is a database (SQLite or PostgreSQL) behind one small interface: write a group of records in one
transaction, read one back, search and page through summaries, return a kept input image, apply retention.
It knows nothing of HTTP, queues or metrics; :class:`~service.audit.store.AuditStore` adds those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


class AuditError(Exception):
    """Base class of the audit store's exceptions."""


class StoreUnavailable(AuditError):
    """The database cannot be reached or cannot commit now (down, unwritable, locked too long)."""


class RecordRejected(AuditError):
    """The database refused the rows themselves (a constraint or a value it cannot store), not the connection."""


class InvalidQuery(AuditError, ValueError):
    """A search filter or cursor that cannot be used (the message says which, for a human)."""


@dataclass(frozen=True)
class KeptInput:
    """An input image kept for review: a thumbnail (JPEG) or the bytes the client sent."""

    media_type: str
    data: bytes
    kind: str = "thumbnail"   # "thumbnail" | "original"


@dataclass(frozen=True)
class ImageSummary:
    """One image of a prediction, as search sees it: its top-1 class, whether its input was kept, and its
    unfamiliar-input flag (``None`` for a model without a detector)."""

    n: int
    label: str | None
    score: float | None
    input_kept: bool
    familiar: bool | None = None

    def to_json(self) -> dict[str, Any]:
        item = {"n": self.n, "label": self.label, "score": self.score, "input_kept": self.input_kept}
        return item if self.familiar is None else item | {"familiar": self.familiar}


@dataclass(frozen=True)
class Summary:
    """One prediction in a search page or an export."""

    id: str
    created_at: float
    model_name: str | None
    model_version: str | None
    route: str | None
    masks_kept: bool
    images: tuple[ImageSummary, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "created_at": self.created_at,
                "model": {"name": self.model_name, "version": self.model_version}, "route": self.route,
                "image_count": len(self.images), "masks_kept": self.masks_kept,
                "images": [image.to_json() for image in self.images]}


@dataclass(frozen=True)
class Page:
    items: list[Summary]
    next_cursor: str | None


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep at most this many records / bytes, none older than ``max_age_s``; ``None`` means no limit."""

    max_age_s: float | None = 30 * 86400.0
    max_records: int | None = 100_000
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_records is not None and self.max_records < 1:
            raise ValueError("max_records must be >= 1 (or None for no limit)")
        if self.max_age_s is not None and self.max_age_s <= 0:
            raise ValueError("max_age_s must be > 0 (or None for no limit)")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError("max_bytes must be >= 1 (or None for no limit)")


@dataclass
class RetentionResult:
    """Records deleted by one retention pass, by the rule that deleted them."""

    deleted: dict[str, int] = field(default_factory=lambda: {"age": 0, "count": 0, "bytes": 0})

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


class Backend(ABC):
    """A database holding audit records. Every method may raise :class:`StoreUnavailable`; methods are
    thread-safe (each call takes its own connection, or a lock where the database is one connection)."""

    name: ClassVar[str]

    @abstractmethod
    def open(self) -> None:
        """Connect and bring the schema to the current version (safe when several processes do it at once)."""

    @abstractmethod
    def close(self) -> None:
        """Release every connection."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers now."""

    @abstractmethod
    def write(self, rows: Sequence[Any]) -> None:
        """Insert encoded records (:class:`~service.audit.records.EncodedRecord`) in one transaction;
        ids already stored are left as they are."""

    @abstractmethod
    def get(self, prediction_id: str) -> dict[str, Any] | None:
        """The full record of one prediction, or ``None``."""

    @abstractmethod
    def kept_input(self, prediction_id: str, n: int) -> KeptInput | None:
        """The kept input of image ``n`` of a prediction, or ``None``."""

    @abstractmethod
    def search(self, filters: Any, *, limit: int, cursor: str | None) -> Page:
        """One page of summaries matching :class:`~service.audit.query.Filters`, newest first."""

    @abstractmethod
    def export(self, filters: Any) -> Iterator[Summary]:
        """Every summary matching ``filters``, newest first, read page by page (no long transaction)."""

    @abstractmethod
    def analyze(self) -> None:
        """Refresh the query planner's statistics."""

    @abstractmethod
    def apply_retention(self, policy: RetentionPolicy, now: float) -> RetentionResult:
        """Delete what ``policy`` no longer keeps, oldest first, in short transactions."""
