"""The service's audit store from its settings (``MACULA_AUDIT_*``), with its metrics in the app's registry."""

from __future__ import annotations

from functools import partial
from typing import Any

from .backends import open_backend
from .inputs import keep_input
from .interface import RetentionPolicy
from .metrics import AuditMetrics
from .store import AuditStore


def store_url(settings: Any) -> str:
    """``MACULA_AUDIT_URL`` when set, else ``MACULA_AUDIT_DB`` (an SQLite path; ``""`` turns auditing off)."""
    url = settings.audit_url.get_secret_value() if settings.audit_url is not None else ""
    return url or settings.audit_db


def build_store(settings: Any, metrics: Any) -> AuditStore:
    """The store the settings describe, not started yet. Raises ValueError for an unusable URL."""
    backend = open_backend(store_url(settings), durable=settings.audit_durable, pool_size=settings.audit_pool_size)
    policy = RetentionPolicy(max_age_s=settings.audit_max_age_days * 86400.0, max_records=settings.audit_max_records,
                             max_bytes=settings.audit_max_bytes)
    return AuditStore(backend, durable=settings.audit_durable, retention=policy,
                      retention_interval_s=settings.audit_retention_interval_s, queue_size=settings.audit_queue_size,
                      commit_timeout_s=settings.audit_commit_timeout_s,
                      metrics=None if backend is None else AuditMetrics(metrics.registry, backend.name),
                      on_write=metrics.audit_written, on_failure=metrics.audit_failed)


def input_keeper(settings: Any, store: AuditStore) -> partial | None:
    """What the decode step calls to keep an input (``MACULA_AUDIT_INPUTS``), or None when nothing is kept."""
    if not store.enabled or settings.audit_inputs == "none":
        return None
    return partial(keep_input, settings.audit_inputs)
