"""``MACULA_AUDIT_URL`` → a backend: ``sqlite:///PATH`` (the embedded default), ``postgresql://USER:PASS@HOST:PORT/DB``.

A bare path (``MACULA_AUDIT_DB``, as before URLs) is an SQLite file; ``""`` means no audit store. SQLite URLs
follow SQLAlchemy's form: ``sqlite:///audit.db`` is relative to the working directory, ``sqlite:////data/a.db``
absolute, ``sqlite:///:memory:`` in memory. The PostgreSQL driver is imported only when a PostgreSQL URL is used.
"""

from __future__ import annotations

from .interface import Backend
from .sqlite import MEMORY, SqliteBackend

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def open_backend(url: str, *, durable: bool = False, pool_size: int = 4) -> Backend | None:
    """The backend an audit URL or SQLite path names, not yet opened; None for ``""`` (auditing off)."""
    if not url:
        return None
    if url.startswith(POSTGRES_PREFIXES):
        from .postgres import PostgresBackend

        return PostgresBackend(url, pool_size=pool_size)
    if url in ("sqlite://", "sqlite:///:memory:"):
        return SqliteBackend(MEMORY, durable=durable)
    if url.startswith(SQLITE_PREFIX):
        return SqliteBackend(url.removeprefix(SQLITE_PREFIX), durable=durable)
    if "://" in url:
        raise ValueError(f"unsupported audit store URL scheme in {url.split('://')[0]!r}://...: use "
                         "sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB")
    return SqliteBackend(url, durable=durable)
