"""The audit trail: every prediction's record in SQLite or PostgreSQL, searchable, with its inputs kept.

``interface`` (the backend contract and the store's exceptions), ``backends`` (``MACULA_AUDIT_URL`` → a
backend), ``sqlite`` / ``postgres`` (the backends, on the shared SQL in ``sql``), ``query`` (filters, cursors),
``records`` (record → rows, masks back out), ``inputs`` (kept thumbnails), ``store`` (queue, group commit,
durable mode, faults), ``retention``, ``metrics``, ``factory`` (the store from the service's settings) and
``routes`` (search, export, records, kept images).
"""

from .backends import open_backend
from .inputs import keep_input, thumbnail
from .interface import (
                        AuditError,
                        InvalidQuery,
                        KeptInput,
                        Page,
                        RecordRejected,
                        RetentionPolicy,
                        StoreUnavailable,
                        Summary,
)
from .query import Filters
from .records import mask_modules, mask_png
from .sqlite import MEMORY
from .store import AuditStore

__all__ = ["MEMORY", "AuditError", "AuditStore", "Filters", "InvalidQuery", "KeptInput", "Page", "RecordRejected",
           "RetentionPolicy", "StoreUnavailable", "Summary", "keep_input", "mask_modules", "mask_png", "open_backend",
           "thumbnail"]
