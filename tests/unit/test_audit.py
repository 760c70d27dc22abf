"""AuditStore: round trip, retention, failure counting, concurrency, draining."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from service.audit import AuditStore


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
    return {"id": f"pred-{i:05d}", "created_at": created_at, "model": {"name": "demo", "version": "abc123def456"},
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


@pytest.mark.parametrize("where", ["file", "memory"])
def test_round_trip_returns_what_was_submitted(store_factory, tmp_path, where):
    written, failed = Tally(), Tally()
    store = store_factory(None if where == "file" else ":memory:", on_write=written, on_failure=failed)
    records = [make_record(i) for i in range(3)]
    for record in records:
        store.submit(record)
    assert store.flush(timeout=5)
    for record in records:
        assert store.get(record["id"]) == record
    assert store.get("no-such-id") is None
    assert (written.total, failed.total) == (3, 0)


def test_rows_carry_the_indexed_columns(store_factory, tmp_path):
    store = store_factory(max_age_s=None)
    store.submit(make_record(7, created_at=1234.5))
    assert store.flush(timeout=5)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        row = conn.execute("SELECT id, created_at, model_name, model_version, route, latency_ms FROM predictions")
        assert row.fetchone() == ("pred-00007", 1234.5, "demo", "abc123def456", "/v1/predict", 19.5)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(predictions)")}
        assert "predictions_created_at" in indexes


def test_record_is_readable_before_the_writer_gets_to_it(tmp_path):
    store = AuditStore(str(tmp_path / "audit.db"))   # writer not started: the record waits in the queue
    store.submit(make_record(1))
    assert store.get("pred-00001") == make_record(1)
    assert store.close(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == ["pred-00001"]


def test_retention_by_count_keeps_the_newest(store_factory, tmp_path):
    store = store_factory(max_records=5, max_age_s=None)
    for i in range(12):
        store.submit(make_record(i, created_at=1000.0 + i))
        if i % 4 == 3:
            assert store.flush(timeout=5)
    assert store.flush(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == [f"pred-{i:05d}" for i in range(7, 12)]
    assert store.get("pred-00003") is None
    assert store.get("pred-00011") is not None


def test_retention_by_count_survives_a_reopen(store_factory, tmp_path):
    first = store_factory(max_records=4, max_age_s=None)
    for i in range(4):
        first.submit(make_record(i, created_at=1000.0 + i))
    assert first.close(timeout=5)
    second = store_factory(max_records=4, max_age_s=None)
    second.submit(make_record(4, created_at=1004.0))
    assert second.flush(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == [f"pred-{i:05d}" for i in range(1, 5)]


def test_retention_by_age_uses_the_clock(store_factory, tmp_path):
    clock = Clock(now=10_000.0)
    store = store_factory(max_records=None, max_age_s=100.0, clock=clock)
    store.submit(make_record(0, created_at=9_850.0))   # already too old: dropped by the same write
    store.submit(make_record(1, created_at=9_950.0))
    store.submit(make_record(2, created_at=10_000.0))
    assert store.flush(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == ["pred-00001", "pred-00002"]
    clock.now = 10_060.0
    store.submit(make_record(3, created_at=10_060.0))
    assert store.flush(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == ["pred-00002", "pred-00003"]


def test_record_without_created_at_gets_the_clock_time(store_factory):
    store = store_factory(":memory:", clock=Clock(now=42.0), max_age_s=None)
    record = make_record(1)
    del record["created_at"]
    store.submit(record)
    assert store.flush(timeout=5)
    assert store.get("pred-00001") == record


def test_unwritable_directory_counts_failures_and_never_raises(store_factory, tmp_path):
    written, failed = Tally(), Tally()
    store = store_factory(str(tmp_path / "missing" / "dir" / "audit.db"), on_write=written, on_failure=failed)
    for i in range(5):
        store.submit(make_record(i))
    assert store.flush(timeout=5)
    assert (written.total, failed.total) == (0, 5)
    assert store.get("pred-00000") is None


def test_garbage_database_file_counts_failures_and_recovers(store_factory, tmp_path):
    db = tmp_path / "audit.db"
    db.write_bytes(b"this is not an sqlite database, just garbage " * 200)
    written, failed = Tally(), Tally()
    store = store_factory(on_write=written, on_failure=failed)
    store.submit(make_record(0))
    assert store.flush(timeout=5)
    assert (written.total, failed.total) == (0, 1)
    assert store.get("pred-00000") is None
    db.unlink()   # the operator fixes it: the next write reopens the database
    store.submit(make_record(1))
    assert store.flush(timeout=5)
    assert (written.total, failed.total) == (1, 1)
    assert store.get("pred-00001") == make_record(1)


def test_bad_records_are_counted_not_raised(store_factory):
    written, failed = Tally(), Tally()
    store = store_factory(":memory:", on_write=written, on_failure=failed)
    store.submit({"no": "id"})
    store.submit("not a dict")   # type: ignore[arg-type]
    store.submit(make_record(1, images=b"bytes are not JSON"))
    store.submit(make_record(2))
    assert store.flush(timeout=5)
    assert (written.total, failed.total) == (1, 3)
    assert store.get("pred-00002") == make_record(2)


def test_full_queue_drops_without_blocking(tmp_path):
    failed = Tally()
    store = AuditStore(str(tmp_path / "audit.db"), queue_size=3, on_failure=failed)   # writer not started
    for i in range(5):
        store.submit(make_record(i))
    assert failed.total == 2
    assert store.close(timeout=5)
    assert stored_ids(tmp_path / "audit.db") == [f"pred-{i:05d}" for i in range(3)]


def test_broken_callback_does_not_break_the_store(store_factory):
    def explode(n: int) -> None:
        raise RuntimeError("metrics are down")

    store = store_factory(":memory:", on_write=explode, on_failure=explode)
    store.submit(make_record(1))
    store.submit({"bad": "record"})
    assert store.flush(timeout=5)
    assert store.get("pred-00001") == make_record(1)


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
                assert store.get("pred-00000") == make_record(0)
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
    assert store.close(timeout=5)   # closing twice is fine


def test_empty_path_disables_the_store(tmp_path):
    written, failed = Tally(), Tally()
    store = AuditStore("", on_write=written, on_failure=failed)
    store.start()
    assert not store.enabled
    store.submit(make_record(1))
    assert store.flush(timeout=1) and store.get("pred-00001") is None
    assert store.close(timeout=1)
    assert (written.total, failed.total) == (0, 0)


@pytest.mark.parametrize("kwargs", [{"max_records": 0}, {"max_age_s": 0.0}, {"max_age_s": -5.0}])
def test_nonsense_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        AuditStore(":memory:", **kwargs)
