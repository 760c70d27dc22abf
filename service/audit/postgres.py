"""The shared backend: one PostgreSQL database for every replica, through psycopg 3 and psycopg_pool.

The writer thread's group commits go through one dedicated connection, reconnected by the store's own backoff
when the server goes away (so durable mode recovers as soon as the server is back, not on a pool's schedule).
Reads and retention take connections from a small pool that checks each one before handing it out. Schema
changes run under a transaction-scoped advisory lock, so replicas that start together migrate one at a time;
retention takes a session advisory lock too, so only one replica prunes at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from .interface import RecordRejected, RetentionPolicy, RetentionResult, StoreUnavailable
from .sql import SqlBackend

MIGRATION_LOCK = 0x6D6163756C61   # "macula": pg_advisory_xact_lock key for schema changes
RETENTION_LOCK = MIGRATION_LOCK + 1


@contextmanager
def _translated() -> Iterator[None]:
    """psycopg's exceptions → the store's: the rows are the problem, or the server or the network is."""
    try:
        yield
    except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
        raise RecordRejected(f"postgresql: {exc}") from exc
    except psycopg.Error as exc:   # OperationalError (down, restarting, PoolTimeout), InterfaceError, read-only...
        raise StoreUnavailable(f"postgresql: {str(exc).strip()}") from exc


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://<unparsable url>"
    user, host, port, db = (info.get(k, "") for k in ("user", "host", "port", "dbname"))
    return f"postgresql://{user}@{host}:{port or 5432}/{db}"


class PostgresBackend(SqlBackend):
    name = "postgresql"
    placeholder = "%s"
    json_param = "?::jsonb"
    types = {"real": "DOUBLE PRECISION", "bool": "BOOLEAN", "false": "FALSE", "bigint": "BIGINT", "json": "JSONB",
             "blob": "BYTEA"}

    def __init__(self, url: str, *, pool_size: int = 4, connect_timeout_s: float = 3.0,
                 pool_timeout_s: float = 5.0) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._kwargs = {"connect_timeout": max(1, round(connect_timeout_s)), "application_name": "macula",
                        "autocommit": True}
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, kwargs=self._kwargs,
                                    check=ConnectionPool.check_connection, timeout=pool_timeout_s,
                                    reconnect_timeout=max(5.0, 2 * pool_timeout_s), name="macula-audit")
        self._writer: psycopg.Connection | None = None
        self._lock = threading.Lock()   # guards the writer connection
        self._retention_conn: psycopg.Connection | None = None   # set while apply_retention runs

    def __repr__(self) -> str:
        return f"PostgresBackend({redact(self.url)})"

    # ------------------------------------------------------------------ connections

    def open(self) -> None:
        self._pool.open(wait=False)   # the pool connects in the background and keeps trying while it cannot
        with self._lock, _translated():
            self._connection()

    def close(self) -> None:
        with self._lock:
            self._drop_writer()
        self._pool.close(timeout=5.0)

    def ping(self) -> None:
        with self._transaction() as cur:
            cur.execute("SELECT version FROM audit_schema LIMIT 1")

    def _connection(self) -> psycopg.Connection:
        if self._writer is None or self._writer.closed:
            conn = psycopg.connect(self.url, **self._kwargs)
            try:
                with conn.transaction():
                    cur = conn.cursor()
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                    self._migrate(cur)
            except BaseException:
                conn.close()
                raise
            self._writer = conn
        return self._writer

    def _drop_writer(self) -> None:
        if self._writer is not None:
            with suppress(psycopg.Error):
                self._writer.close()
            self._writer = None

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor]:
        """A transaction on the writer connection (group commits, and the schema check)."""
        with self._lock, _translated():
            try:
                conn = self._connection()
                with conn.transaction():
                    yield conn.cursor()
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self._drop_writer()    # reconnect on the next call
                raise

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Cursor]:
        with _translated(), self._pool.connection() as conn:
            yield conn.cursor()

    def analyze(self) -> None:
        """Autovacuum does this on its own schedule; the benchmark calls it right after a bulk fill."""
        with _translated(), self._pool.connection() as conn:
            conn.execute("ANALYZE predictions, prediction_images")

    # ------------------------------------------------------------------ retention, off the writer connection

    @contextmanager
    def _deleting(self) -> Iterator[psycopg.Cursor]:
        """Retention's deletes run on the connection that holds the retention lock (one thread prunes)."""
        conn = self._retention_conn
        if conn is None:
            raise RuntimeError("retention deletes run inside apply_retention only")
        with _translated(), conn.transaction():
            yield conn.cursor()

    def apply_retention(self, policy: RetentionPolicy, now: float) -> RetentionResult:
        """One replica prunes at a time (session advisory lock); the others skip this round."""
        with _translated(), self._pool.connection() as conn:
            if not conn.execute("SELECT pg_try_advisory_lock(%s)", (RETENTION_LOCK,)).fetchone()[0]:
                return RetentionResult()
            self._retention_conn = conn
            try:
                return super().apply_retention(policy, now)
            finally:
                self._retention_conn = None
                conn.execute("SELECT pg_advisory_unlock(%s)", (RETENTION_LOCK,))

    def _load_json(self, value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else super()._load_json(value)
