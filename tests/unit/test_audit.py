"""AuditStore on SQLite: round trip, pending reads, failure counting, queue limits, draining, durable commits,
group commit, recovery after the database comes back, metrics, and files written before schema versioning."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.audit import AuditStore, Filters, KeptInput, StoreUnavailable
from service.audit.metrics import AuditMetrics
from service.audit.sql import SCHEMA_VERSION
from service.audit.sqlite import SqliteBackend


class Tally:
    """Thread-safe stand-in for a Prometheus counter's inc()."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def __call__(self, n: int = 1) -> None:
        with self._lock:
            self.total += n


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


NOW = time.time()


def make_record(i: int, created_at: float = NOW, **extra) -> dict:
    return {"id": f"pred{i:05d}", "created_at": created_at, "model": {"name": "demo", "version": "abc123def456"},
            "route": "/v1/predict", "latency_ms": 12.5 + i,
            "images": [{"sha256": "0" * 64, "bytes": 1234, "width": 32, "height": 32,
                        "top_k": [{"index": 3, "label": "3", "score": 0.9}],
                        "attention": [{"module": "layer1.0.cbam", "height": 8, "width": 8, "png": "iVBORw0KGgo="}]}],
            **extra}


@pytest.fixture
def store_factory(tmp_path: Path):
    stores: list[AuditStore] = []

    def make(path: str | None = None, **kwargs) -> AuditStore:
        store = AuditStore(str(tmp_path / "audit.db") if path is None else path, **kwargs)
        store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close(timeout=5)


def stored_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM predictions ORDER BY created_at")]


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"backend": "sqlite", **labels})
    return 0.0 if value is None else value


@pytest.mark.parametrize("where", ["file", "memory"])
def test_round_trip_returns_what_was_submitted(store_factory, where):
    written, failed = Tally(), Tally()
    store = store_factory(None if where == "file" else ":memory:", on_write=written, on_failure=failed)
    records = [make_record(i) for i in range(3)]
    for record in records:
        store.submit(record)
    assert store.flush(timeout=5)
    for record in records:
        assert store.get(record["id"]) == record
    assert store.get("nosuchid") is None
    assert (written.total, failed.total) == (3, 0)


def test_rows_carry_the_searchable_columns(store_factory, tmp_path):
    store = store_factory(max_age_s=None)
    store.submit(make_record(7, created_at=1234.5))
    assert store.flush(timeout=5)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        row = conn.execute("SELECT id, created_at, model_name, model_version, route, latency_ms, image_count, "
                           "masks_kept FROM predictions").fetchone()
        assert row == ("pred00007", 1234.5, "demo", "abc123def456", "/v1/predict", 19.5, 1, 1)
        image = conn.execute("SELECT prediction_id, n, label, score, input_kept, familiar "
                             "FROM prediction_images").fetchone()
        assert image == ("pred00007", 0, "3", 0.9, 0, None)   # no detector: no flag
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM audit_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_record_is_readable_before_the_writer_gets_to_it(tmp_path):
    store = AuditStore(str(tmp_path / "audit.db"))   # writer not started: the record waits in the queue
    kept = KeptInput("image/jpeg", b"\xff\xd8\xff thumbnail")
    store.submit(make_record(1), [kept])
    assert store.get("pred00001") == make_record(1)
    assert store.kept_input("pred00001", 0) == kept and store.kept_input("pred00001", 1) is None
    assert store.close(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == ["pred00001"]


def test_kept_inputs_are_stored_and_marked_in_the_record(store_factory):
    store = store_factory(":memory:")
    kept = KeptInput("image/png", b"\x89PNG\r\n\x1a\n original bytes", "original")
    store.submit(make_record(1), [kept])
    store.submit(make_record(2), [None])
    assert store.flush(timeout=5)
    assert store.kept_input("pred00001", 0) == kept
    assert store.kept_input("pred00002", 0) is None
    image = store.get("pred00001")["images"][0]
    assert image["input"] == {"kept": "original", "media_type": "image/png", "bytes": len(kept.data)}
    assert "input" not in store.get("pred00002")["images"][0]


def test_kept_input_and_each_modules_mask_come_back_through_the_store(store_factory):
    """What an overlay needs: the image the model saw and every module's mask, by prediction id."""
    import base64
    import io

    from PIL import Image

    store = store_factory(":memory:")
    masks = {}
    for module, value in (("layer1.0.cbam", 10), ("layer2.0.cbam", 200)):
        buf = io.BytesIO()
        Image.new("L", (4, 4), value).save(buf, format="PNG")
        masks[module] = buf.getvalue()
    record = make_record(1)
    record["images"][0]["attention"] = [{"module": m, "height": 4, "width": 4, "png": base64.b64encode(p).decode()}
                                        for m, p in masks.items()]
    store.submit(record, [KeptInput("image/jpeg", b"\xff\xd8\xff thumbnail")])
    assert store.flush(timeout=5)
    assert store.kept_input("pred00001", 0).data == b"\xff\xd8\xff thumbnail"
    for module, png in masks.items():
        assert store.mask("pred00001", 0, module) == png
    assert store.mask("pred00001", 0, "layer3.0.cbam") is None and store.mask("nosuchid", 0, "layer1.0.cbam") is None


def test_record_without_created_at_gets_the_clock_time(store_factory):
    store = store_factory(":memory:", clock=Clock(now=42.0), max_age_s=None)
    record = make_record(1)
    del record["created_at"]
    store.submit(record)
    assert store.flush(timeout=5)
    assert store.get("pred00001") == record
    assert store.search(Filters()).items[0].created_at == 42.0


def test_unwritable_directory_counts_failures_and_never_raises(store_factory, tmp_path):
    written, failed = Tally(), Tally()
    store = store_factory(str(tmp_path / "missing" / "dir" / "audit.db"), on_write=written, on_failure=failed)
    for i in range(5):
        store.submit(make_record(i))
    assert store.flush(timeout=5)
    assert (written.total, failed.total) == (0, 5)
    assert not store.healthy
    with pytest.raises(StoreUnavailable):
        store.get("pred00000")


def test_garbage_database_file_counts_failures_and_recovers(tmp_path):
    db = tmp_path / "audit.db"
    db.write_bytes(b"this is not an sqlite database, just garbage " * 200)
    registry = CollectorRegistry()
    written, failed = Tally(), Tally()
    store = AuditStore(str(db), on_write=written, on_failure=failed, metrics=AuditMetrics(registry, "sqlite"))
    store.start()
    try:
        store.submit(make_record(0))
        assert store.flush(timeout=5)
        assert (written.total, failed.total) == (0, 1)
        assert metric(registry, "macula_audit_dropped_records_total", reason="store_unavailable") == 1
        assert metric(registry, "macula_audit_store_up") == 0
        db.unlink()   # the operator fixes it: the writer reopens the database by itself
        deadline = time.monotonic() + 10
        while not store.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.healthy
        store.submit(make_record(1))
        assert store.flush(timeout=5)
        assert (written.total, failed.total) == (1, 1)
        assert store.get("pred00001") == make_record(1)
        assert metric(registry, "macula_audit_reconnects_total") == 1
        assert metric(registry, "macula_audit_store_up") == 1
    finally:
        store.close(timeout=5)


def test_bad_records_are_counted_not_raised(store_factory):
    written, failed = Tally(), Tally()
    store = store_factory(":memory:", on_write=written, on_failure=failed)
    store.submit({"no": "id"})
    store.submit("not a dict")   # type: ignore[arg-type]
    store.submit(make_record(1, images=b"bytes are not JSON"))
    store.submit(make_record(3, latency_ms=float("nan")))   # not valid JSON either
    store.submit(make_record(2))
    assert store.flush(timeout=5)
    assert (written.total, failed.total) == (1, 4)
    assert store.get("pred00002") == make_record(2)


def test_full_queue_drops_without_blocking(tmp_path):
    registry = CollectorRegistry()
    failed = Tally()
    store = AuditStore(str(tmp_path / "audit.db"), queue_size=3, on_failure=failed,
                       metrics=AuditMetrics(registry, "sqlite"))   # writer not started
    for i in range(5):
        store.submit(make_record(i))
    assert failed.total == 2
    assert metric(registry, "macula_audit_dropped_records_total", reason="queue_full") == 2
    assert metric(registry, "macula_audit_queue_depth") == 3
    assert store.close(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == [f"pred{i:05d}" for i in range(3)]


def test_broken_callback_does_not_break_the_store(store_factory):
    def explode(n: int) -> None:
        raise RuntimeError("metrics are down")

    store = store_factory(":memory:", on_write=explode, on_failure=explode)
    store.submit(make_record(1))
    store.submit({"bad": "record"})
    assert store.flush(timeout=5)
    assert store.get("pred00001") == make_record(1)


def test_concurrent_submits_from_many_threads(store_factory, tmp_path):
    written, failed = Tally(), Tally()
    store = store_factory(on_write=written, on_failure=failed, max_records=None)
    threads, per_thread = 16, 50
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        start.wait()
        for j in range(per_thread):
            store.submit(make_record(t * per_thread + j))

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=10)
    assert store.flush(timeout=10)
    assert (written.total, failed.total) == (threads * per_thread, 0)
    assert len(set(stored_ids(tmp_path / "audit.db"))) == threads * per_thread


def test_reads_while_writing_see_consistent_records(store_factory):
    store = store_factory(max_records=None)
    store.submit(make_record(0))
    assert store.flush(timeout=5)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(100):
                assert store.get("pred00000") == make_record(0)
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    for i in range(1, 300):
        store.submit(make_record(i))
    for thread in readers:
        thread.join(timeout=10)
    assert errors == []
    assert store.flush(timeout=5)


def test_close_drains_everything_queued(tmp_path):
    written = Tally()
    store = AuditStore(str(tmp_path / "audit.db"), on_write=written, max_records=None)
    store.start()
    for i in range(500):
        store.submit(make_record(i))
    assert store.close(timeout=10)
    assert written.total == 500
    assert len(stored_ids(tmp_path / "audit.db")) == 500


def test_submit_after_close_is_dropped_and_counted(tmp_path):
    failed = Tally()
    store = AuditStore(":memory:", on_failure=failed)
    store.start()
    assert store.close(timeout=5)
    store.submit(make_record(1))
    assert failed.total == 1
    with pytest.raises(StoreUnavailable):
        store.commit(make_record(2)).result(timeout=1)
    assert store.close(timeout=5)   # closing twice is fine


def test_empty_path_disables_the_store():
    written, failed = Tally(), Tally()
    store = AuditStore("", on_write=written, on_failure=failed)
    store.start()
    assert not store.enabled
    store.submit(make_record(1))
    assert store.commit(make_record(2)).result(timeout=1) is None
    assert store.flush(timeout=1) and store.get("pred00001") is None
    assert store.search(Filters()).items == []
    assert store.close(timeout=1)
    assert (written.total, failed.total) == (0, 0)


@pytest.mark.parametrize("kwargs", [{"max_records": 0}, {"max_age_s": 0.0}, {"max_age_s": -5.0}, {"max_bytes": 0}])
def test_nonsense_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        AuditStore(":memory:", **kwargs)


# ---------------------------------------------------------------------------------------------- durable mode


def test_durable_commit_completes_after_the_record_is_in_the_database(store_factory, tmp_path):
    store = store_factory(durable=True)
    future = store.commit(make_record(1))
    assert future.result(timeout=5) is None
    assert stored_ids(tmp_path / "audit.db") == ["pred00001"]   # committed, visible to another connection


def test_durable_commits_share_transactions(tmp_path):
    """Group commit: records waiting together are written in one transaction."""
    registry = CollectorRegistry()
    store = AuditStore(str(tmp_path / "audit.db"), durable=True, metrics=AuditMetrics(registry, "sqlite"))
    futures = [store.commit(make_record(i)) for i in range(40)]   # queued before the writer starts
    store.start()
    try:
        concurrent.futures.wait(futures, timeout=10)
        assert all(f.result() is None for f in futures)
        commits = metric(registry, "macula_audit_commit_records_count")
        assert commits == 1 and metric(registry, "macula_audit_commit_records_sum") == 40
        assert metric(registry, "macula_audit_write_duration_seconds_count") == 1
    finally:
        store.close(timeout=5)


def test_durable_commit_fails_when_the_database_cannot_commit(tmp_path):
    registry = CollectorRegistry()
    failed = Tally()
    store = AuditStore(str(tmp_path / "no" / "such" / "dir.db"), durable=True, on_failure=failed,
                       metrics=AuditMetrics(registry, "sqlite"))
    store.start()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.commit(make_record(1)).result(timeout=5)
        assert time.monotonic() - started < 4   # refused at once while known down, not after a timeout
        assert metric(registry, "macula_audit_dropped_records_total", reason="refused") == 1
        assert failed.total == 1
    finally:
        store.close(timeout=5)


def test_durable_save_from_the_event_loop(tmp_path):
    store = AuditStore(str(tmp_path / "audit.db"), durable=True, commit_timeout_s=5)
    store.start()
    try:
        asyncio.run(store.save(make_record(1), [KeptInput("image/jpeg", b"\xff\xd8\xffjpeg")]))
        assert stored_ids(tmp_path / "audit.db") == ["pred00001"]
        assert store.kept_input("pred00001", 0).data == b"\xff\xd8\xffjpeg"
    finally:
        store.close(timeout=5)


def test_durable_save_times_out_as_unavailable(tmp_path):
    store = AuditStore(str(tmp_path / "audit.db"), durable=True, commit_timeout_s=0.2)   # writer never started
    with pytest.raises(StoreUnavailable, match="not committed within"):
        asyncio.run(store.save(make_record(1)))
    assert store.close(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == ["pred00001"]   # written late: a 503 with a record is allowed


# ---------------------------------------------------------------------------------------------- schema


LEGACY_SCHEMA = """
CREATE TABLE predictions (id TEXT PRIMARY KEY, created_at REAL NOT NULL, model_name TEXT, model_version TEXT,
                          route TEXT, latency_ms REAL, record TEXT NOT NULL);
CREATE INDEX predictions_created_at ON predictions (created_at);
"""


def test_a_file_from_before_schema_versioning_is_upgraded_in_place(tmp_path):
    db = tmp_path / "old.db"
    old = make_record(1, created_at=1000.0)
    with sqlite3.connect(db) as conn:
        conn.executescript(LEGACY_SCHEMA)
        conn.execute("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (old["id"], 1000.0, "demo", "abc123def456", "/v1/predict", 13.5, json.dumps(old)))
    store = AuditStore(str(db), max_age_s=None)
    store.start()
    try:
        store.submit(make_record(2, created_at=2000.0))
        assert store.flush(timeout=5)
        assert store.get("pred00001") == old
        page = store.search(Filters(label="3"))
        assert [s.id for s in page.items] == ["pred00002", "pred00001"]
        assert page.items[1].masks_kept and page.items[1].images[0].score == 0.9
        assert store.search(Filters(familiar=False)).items == store.search(Filters(familiar=True)).items == []
    finally:
        store.close(timeout=5)


def test_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "future.db"
    SqliteBackend(str(db)).open()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_schema SET version = 99")
    with pytest.raises(RuntimeError, match="schema version 99"):
        SqliteBackend(str(db)).open()


def test_store_metrics_are_valid_prometheus_with_bounded_labels():
    import shutil
    import subprocess

    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    metrics = AuditMetrics(registry, "sqlite")
    metrics.observe_commit(0.004, 12)
    metrics.dropped("something new")     # an unknown reason is folded into "error", never a new series
    metrics.retention_deleted("bytes", 3)
    text = generate_latest(registry).decode()
    assert metric(registry, "macula_audit_dropped_records_total", reason="error") == 1
    assert 'reason="something new"' not in text
    for reason in ("queue_full", "store_unavailable", "refused", "invalid", "closed"):
        assert metric(registry, "macula_audit_dropped_records_total", reason=reason) == 0   # exported from the start
    assert metric(registry, "macula_audit_retention_deleted_records_total", rule="bytes") == 3
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian 'prometheus': make system-deps)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
