"""Prometheus metrics of the audit store, labelled by backend (``sqlite`` or ``postgresql``).

The app-wide totals (``macula_audit_records_written_total``, ``macula_audit_write_failures_total``) stay in
``service.metrics``; these add how long commits take, how far the writer is behind, why records were dropped,
and how often the store came back. Drop reasons are a fixed set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# queue_full: the writer was too far behind; store_unavailable: the database could not commit (best-effort
# records lost); refused: durable mode answered 503 instead (nothing lost); invalid: not a storable record;
# closed: submitted after shutdown began; error: an unexpected failure in the writer (logged)
DROP_REASONS = ("queue_full", "store_unavailable", "refused", "invalid", "closed", "error")
RETENTION_RULES = ("age", "count", "bytes")


class AuditMetrics:
    def __init__(self, registry: CollectorRegistry, backend: str) -> None:
        self.backend = backend
        self.write_duration_seconds = Histogram(
            "macula_audit_write_duration_seconds", "Time of one audit commit (a group of records, one transaction)",
            ["backend"], buckets=WRITE_BUCKETS, registry=registry).labels(backend)
        self.batch_records = Histogram(
            "macula_audit_commit_records", "Records per audit commit (group commit size)", ["backend"],
            buckets=BATCH_BUCKETS, registry=registry).labels(backend)
        self.queue_depth = Gauge("macula_audit_queue_depth", "Audit records waiting for the writer", ["backend"],
                                 registry=registry).labels(backend)
        self._dropped = Counter("macula_audit_dropped_records", "Audit records not written, by reason", ["backend",
                                "reason"], registry=registry)
        self.reconnects_total = Counter("macula_audit_reconnects", "Times the audit store came back after failing",
                                        ["backend"], registry=registry).labels(backend)
        self.up = Gauge("macula_audit_store_up", "1 while the audit store commits, 0 after a failed commit until "
                        "it is back", ["backend"], registry=registry).labels(backend)
        self._retention_deleted = Counter("macula_audit_retention_deleted_records", "Audit records deleted by "
                                          "retention, by rule", ["backend", "rule"], registry=registry)
        for reason in DROP_REASONS:          # every series exists from the start, at 0
            self._dropped.labels(backend, reason)
        for rule in RETENTION_RULES:
            self._retention_deleted.labels(backend, rule)

    def dropped(self, reason: str, count: int = 1) -> None:
        self._dropped.labels(self.backend, reason if reason in DROP_REASONS else "error").inc(count)

    def observe_commit(self, seconds: float, records: int) -> None:
        self.write_duration_seconds.observe(seconds)
        self.batch_records.observe(records)

    def retention_deleted(self, rule: str, count: int) -> None:
        if count:
            self._retention_deleted.labels(self.backend, rule).inc(count)
