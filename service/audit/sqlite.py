"""The embedded backend: one SQLite file (WAL journal), or ``:memory:`` for tests.

Writes (the writer thread's group commits and retention's deletes) share one connection under a lock; reads
open their own read-only connection, so with WAL they never wait for a writer. ``BEGIN IMMEDIATE`` takes the
file's write lock before the schema is checked, so processes that start together migrate one after another.
Durable stores commit with ``synchronous=FULL`` (the commit survives a power cut); best-effort ones with
``NORMAL`` (it survives the process being killed). One file per host: SQLite's locking is not safe over
network file systems.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .interface import RecordRejected, RetentionPolicy, RetentionResult, StoreUnavailable
from .records import encode
from .sql import SqlBackend

MEMORY = ":memory:"
BUSY_TIMEOUT_S = 5.0


@contextmanager
def _translated() -> Iterator[None]:
    """sqlite3's exceptions → the store's: the file or its lock is the problem, or the rows are."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError, sqlite3.InterfaceError) as exc:
        raise RecordRejected(f"sqlite: {exc}") from exc
    except sqlite3.Error as exc:   # OperationalError (locked, read-only, disk full, no such file), corruption
        raise StoreUnavailable(f"sqlite: {exc}") from exc


class SqliteBackend(SqlBackend):
    name = "sqlite"
    types = {"real": "REAL", "bool": "INTEGER", "false": "0", "bigint": "INTEGER", "json": "TEXT", "blob": "BLOB"}

    def __init__(self, path: str, *, durable: bool = False) -> None:
        if not path:
            raise ValueError("an SQLite audit store needs a path (or ':memory:')")
        self.path = path
        self.durable = durable
        self._lock = threading.RLock()   # guards the write connection (and, in memory, the only connection)
        self._conn: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ connections

    def open(self) -> None:
        with self._lock, _translated():
            self._connection()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self.path != MEMORY:
                self._conn.close()
                self._conn = None

    def ping(self) -> None:
        with self._transaction() as cur:
            cur.execute("SELECT 1 FROM audit_schema LIMIT 1")

    def _connection(self) -> sqlite3.Connection:
        """The write connection, opened and migrated on first use (and again after a failure closed it)."""
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            try:
                self._set_up(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """Pragmas and migration. Switching a fresh file to WAL takes an exclusive lock without waiting on the busy
        handler, so replicas starting at once on one new file retry that step until ``BUSY_TIMEOUT_S``."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                conn.execute("PRAGMA foreign_keys=ON")
                if self.path != MEMORY:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
                conn.execute("BEGIN IMMEDIATE")
                self._migrate(conn.cursor())
                conn.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock, _translated():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn.cursor()
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
                        exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.ProgrammingError):
                    self.close()   # reopen (and re-check the schema) next time: the file may have been replaced
                raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Cursor]:
        if self.path == MEMORY:
            with self._lock, _translated():
                yield self._connection().cursor()
            return
        with _translated():
            conn = sqlite3.connect(Path(self.path).absolute().as_uri() + "?mode=ro", uri=True,
                                   timeout=BUSY_TIMEOUT_S, check_same_thread=False)
            try:
                yield conn.cursor()
            finally:
                conn.close()

    def apply_retention(self, policy: RetentionPolicy, now: float) -> RetentionResult:
        result = super().apply_retention(policy, now)
        self.analyze()   # SQLite has no autovacuum to keep the planner's statistics fresh
        return result

    def analyze(self) -> None:
        """Sampled statistics (a few ms even at millions of rows), so the planner picks the right index for each
        filter; run after every retention pass."""
        with self._lock, _translated():
            conn = self._connection()
            conn.execute("PRAGMA analysis_limit=1000")
            conn.execute("ANALYZE")

    # ------------------------------------------------------------------ files from before schema versioning

    def _migrate(self, cur: Any) -> None:
        legacy = self._is_legacy(cur)
        if legacy:
            for column in ("image_count INTEGER NOT NULL DEFAULT 0", "masks_kept INTEGER NOT NULL DEFAULT 0",
                           "nbytes INTEGER NOT NULL DEFAULT 0"):
                cur.execute(f"ALTER TABLE predictions ADD COLUMN {column}")
            cur.execute("DROP INDEX IF EXISTS predictions_created_at")   # was on created_at alone
        super()._migrate(cur)
        if legacy:
            self._backfill(cur)

    @staticmethod
    def _is_legacy(cur: Any) -> bool:
        """A ``predictions`` table without the v1 columns: written by a Macula before schema versioning."""
        tables = {row[0] for row in cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "predictions" not in tables or "audit_schema" in tables:
            return False
        return "image_count" not in {row[1] for row in cur.execute("PRAGMA table_info(predictions)")}

    def _backfill(self, cur: Any) -> None:
        """Fill the v1 columns and image rows of records written before them (masks and labels are in the JSON)."""
        now = time.time()
        for pid, text in cur.execute("SELECT id, record FROM predictions").fetchall():
            try:
                row = encode(json.loads(text), (), now)
            except (TypeError, ValueError):
                continue
            cur.execute("UPDATE predictions SET image_count = ?, masks_kept = ?, nbytes = ? WHERE id = ?",
                        (len(row.images), row.masks_kept, row.nbytes, pid))
            cur.executemany("INSERT OR IGNORE INTO prediction_images (prediction_id, n, created_at, model_name, "
                            "model_version, label, score, input_kept, familiar) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(pid, *image[1:]) for image in row.image_rows()])
