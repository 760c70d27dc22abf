"""Audit store: every prediction's record in an embedded SQLite database, written off the request path.

One writer thread drains a bounded ``queue.Queue`` and writes what it finds in one transaction, then
applies retention (rows older than ``max_age_s``, rows beyond ``max_records``, oldest first). The
request path only calls :meth:`AuditStore.submit`, which never blocks and never raises: when the queue
is full or the database fails, the record is dropped and ``on_failure`` counts it. Records submitted
but not yet written are kept in memory, so :meth:`AuditStore.get` finds a prediction right after its
response was sent.

File databases use WAL mode, so readers (each :meth:`get` opens its own read-only connection) never
wait for the writer. ``":memory:"`` works too (for tests): one connection, shared under a lock.
``""`` gives a disabled store: :meth:`submit` is a no-op and :meth:`get` returns ``None``.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

MEMORY = ":memory:"
_STOP = object()
_MAX_WRITE_BATCH = 256
_RECOUNT_EVERY = 1000   # recount rows now and then, in case another process shares the file
_LOG_EVERY_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    model_name TEXT,
    model_version TEXT,
    route TEXT,
    latency_ms REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_created_at ON predictions (created_at);
"""
_INSERT = ("INSERT OR IGNORE INTO predictions (id, created_at, model_name, model_version, route, latency_ms, record)"
           " VALUES (?, ?, ?, ?, ?, ?, ?)")
_DELETE_OLDER = "DELETE FROM predictions WHERE created_at < ?"
_DELETE_OLDEST = ("DELETE FROM predictions WHERE rowid IN "
                  "(SELECT rowid FROM predictions ORDER BY created_at, rowid LIMIT ?)")

Row = tuple[str, float, Any, Any, Any, Any, str]


def connect(path: str) -> sqlite3.Connection:
    """Open (and create) the database for writing: WAL journal, schema in place."""
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        if path != MEMORY:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def encode(record: dict[str, Any], now: float) -> Row:
    """One table row from a record; the whole record is kept as JSON in ``record``."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise ValueError("an audit record is a dict with a string 'id'")
    model = record.get("model") or {}
    created_at = float(record.get("created_at", now))
    latency = record.get("latency_ms")
    return (record["id"], created_at, model.get("name"), model.get("version"), record.get("route"),
            None if latency is None else float(latency), json.dumps(record, separators=(",", ":")))


class AuditStore:
    """Prediction records in SQLite; see the module docstring.

    ``on_write(n)`` and ``on_failure(n)`` are called with a record count (a Prometheus ``Counter.inc``
    fits); ``clock`` gives the time used for age retention and for records without ``created_at``.
    """

    def __init__(self, path: str, *, max_records: int | None = 100_000, max_age_s: float | None = 30 * 86400.0,
                 on_write: Callable[[int], Any] | None = None, on_failure: Callable[[int], Any] | None = None,
                 queue_size: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        if max_records is not None and max_records < 1:
            raise ValueError("max_records must be >= 1 (or None for no limit)")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError("max_age_s must be > 0 (or None for no limit)")
        self.path = path
        self.max_records = max_records
        self.max_age_s = max_age_s
        self._on_write = on_write
        self._on_failure = on_failure
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._pending: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()           # guards _pending, the counters and _closed
        self._done = threading.Condition(self._lock)
        self._submitted = 0
        self._finished = 0
        self._closed = False
        self._db_lock = threading.Lock()        # guards the shared connection of a ":memory:" store
        self._conn: sqlite3.Connection | None = None
        self._rows = 0
        self._writes_since_count = 0
        self._last_log = 0.0
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    # ------------------------------------------------------------------ request side

    def submit(self, record: dict[str, Any]) -> None:
        """Queue a record for writing. Never blocks, never raises; a dropped record counts as a failure."""
        if not self.enabled:
            return
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("audit store is closed")
                self._queue.put_nowait(record)
                self._submitted += 1
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    self._pending[record["id"]] = record
        except Exception as exc:  # queue.Full, closed store, unhashable junk: drop, count, carry on
            self._failed(1, exc)

    def get(self, prediction_id: str) -> dict[str, Any] | None:
        """The record of one prediction, or ``None``. Blocking: run it in an executor thread."""
        if not self.enabled:
            return None
        with self._lock:
            pending = self._pending.get(prediction_id)
        if pending is not None:   # submitted, not written yet: answer with what will be stored
            try:
                return json.loads(json.dumps(pending))
            except (TypeError, ValueError):
                return None
        try:
            text = self._read(prediction_id)
        except sqlite3.Error as exc:
            self._log(f"audit read failed: {exc}")
            return None
        return None if text is None else json.loads(text)

    def _read(self, prediction_id: str) -> str | None:
        query = "SELECT record FROM predictions WHERE id = ?"
        if self.path == MEMORY:
            with self._db_lock:
                if self._conn is None:
                    return None
                row = self._conn.execute(query, (prediction_id,)).fetchone()
            return None if row is None else row[0]
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.OperationalError:   # no database file yet
            return None
        try:
            row = conn.execute(query, (prediction_id,)).fetchone()
        finally:
            conn.close()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="macula-audit-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is written (or dropped). True if it got there in time."""
        if not self.enabled:
            return True
        with self._done:
            target = self._submitted
            return self._done.wait_for(lambda: self._finished >= target, timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop taking records, write what is queued, stop the writer. True if it drained in time."""
        if not self.enabled:
            return True
        with self._lock:
            already_closed, self._closed = self._closed, True
        if self._thread is None:
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not already_closed:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return False
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._thread.join(remaining)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < _MAX_WRITE_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                try:
                    self._write(batch)
                except Exception:   # a bug here must not kill the writer and strand flush()/close()
                    logger.exception("audit writer failed")
                    self._finish(batch)
                    self._failed(len(batch))
        self._close_connection()

    def _write(self, batch: list[Any]) -> None:
        now = self._clock()
        rows: list[Row] = []
        bad = 0
        for record in batch:
            try:
                rows.append(encode(record, now))
            except (TypeError, ValueError) as exc:
                bad += 1
                self._log(f"audit record not storable: {exc}")
        written = 0
        if rows:
            try:
                self._insert(rows, now)
                written = len(rows)
            except Exception as exc:   # sqlite3.Error mostly; the writer must survive anything
                self._log(f"audit write failed: {exc}")
                self._close_connection()    # reopen on the next batch: the file may be back
        self._finish(batch)
        if written:
            self._notify(self._on_write, written)
        if bad + len(rows) - written:
            self._failed(bad + len(rows) - written)

    def _insert(self, rows: list[Row], now: float) -> None:
        with self._db_lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                inserted = conn.executemany(_INSERT, rows).rowcount
                self._rows += max(inserted, 0)
                self._writes_since_count += len(rows)
                self._apply_retention(conn, now)
                conn.execute("COMMIT")
            except BaseException:
                self._writes_since_count = _RECOUNT_EVERY   # row count unknown: recount next time
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _apply_retention(self, conn: sqlite3.Connection, now: float) -> None:
        if self.max_age_s is not None:
            self._rows -= conn.execute(_DELETE_OLDER, (now - self.max_age_s,)).rowcount
        if self._writes_since_count >= _RECOUNT_EVERY:
            self._rows = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
            self._writes_since_count = 0
        if self.max_records is not None and self._rows > self.max_records:
            self._rows -= conn.execute(_DELETE_OLDEST, (self._rows - self.max_records,)).rowcount

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.path)
            self._rows = self._conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
            self._writes_since_count = 0
        return self._conn

    def _close_connection(self) -> None:
        if self.path == MEMORY:
            return   # closing would lose the data; the connection dies with the store
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ bookkeeping

    def _finish(self, batch: list[Any]) -> None:
        with self._done:
            for record in batch:
                key = record.get("id") if isinstance(record, dict) else None
                if isinstance(key, str) and self._pending.get(key) is record:
                    del self._pending[key]
            self._finished += len(batch)
            self._done.notify_all()

    def _failed(self, count: int, exc: BaseException | None = None) -> None:
        if exc is not None:
            self._log(f"audit record dropped: {exc!r}")
        self._notify(self._on_failure, count)

    def _notify(self, callback: Callable[[int], Any] | None, count: int) -> None:
        if callback is None:
            return
        try:
            callback(count)
        except Exception:   # a broken callback must not break the writer or the request path
            logger.exception("audit callback failed")

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning("%s (further audit warnings suppressed for %.0f s)", message, _LOG_EVERY_S)
