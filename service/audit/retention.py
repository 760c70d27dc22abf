"""Retention off the request path: a thread that prunes by age, count and bytes every ``interval_s``.

Each pass deletes oldest first in short transactions (see :mod:`service.audit.sql`), so the writer and readers
wait for one chunk at most. A failed pass (database down) is logged and tried again at the next interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .interface import AuditError, Backend, RetentionPolicy, RetentionResult
from .metrics import AuditMetrics

log = logging.getLogger(__name__)


class RetentionWorker:
    def __init__(self, backend: Backend, policy: RetentionPolicy, *, interval_s: float,
                 clock: Callable[[], float] = time.time, metrics: AuditMetrics | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("the retention interval must be > 0 s")
        self.backend, self.policy, self.interval_s = backend, policy, interval_s
        self._clock, self._metrics = clock, metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> RetentionResult:
        """One pass now, on the calling thread."""
        result = self.backend.apply_retention(self.policy, self._clock())
        if self._metrics is not None:
            for rule, count in result.deleted.items():
                self._metrics.retention_deleted(rule, count)
        if result.total:
            log.info("audit retention deleted %d record(s): %s", result.total, result.deleted)
        return result

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="macula-audit-retention", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except AuditError as exc:
                log.warning("audit retention pass failed, next try in %.0f s: %s", self.interval_s, exc)
            except Exception:   # a bug here must not end retention for the life of the process
                log.exception("audit retention pass failed")
