"""The SQL both backends share: schema, inserts, reads, search pages and retention.

A backend subclass supplies connections (:meth:`SqlBackend._reading`, :meth:`SqlBackend._transaction`, each
yielding a DB-API cursor), its column types and its placeholder; everything else is here, so SQLite and
PostgreSQL answer the same search with the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from .interface import Backend, ImageSummary, KeptInput, Page, RetentionPolicy, RetentionResult, Summary
from .query import DEFAULT_LIMIT, Filters, check_limit, decode_cursor, encode_cursor, in_list, page_sql
from .records import EncodedRecord

SCHEMA_VERSION = 2
RETENTION_CHUNK = 1000     # rows per delete transaction: short locks, so writers never wait long
EXPORT_PAGE = 500

# {real} {bool} {false} {bigint} {json} {blob}: filled in per backend
SCHEMA_V1 = [
    """CREATE TABLE IF NOT EXISTS predictions (
        id TEXT PRIMARY KEY,
        created_at {real} NOT NULL,
        model_name TEXT,
        model_version TEXT,
        route TEXT,
        latency_ms {real},
        image_count INTEGER NOT NULL DEFAULT 0,
        masks_kept {bool} NOT NULL DEFAULT {false},
        nbytes {bigint} NOT NULL DEFAULT 0,
        record {json} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS predictions_created_at ON predictions (created_at, id)",
    "CREATE INDEX IF NOT EXISTS predictions_model ON predictions (model_name, created_at, id)",
    "CREATE INDEX IF NOT EXISTS predictions_version ON predictions (model_version, created_at, id)",
    """CREATE TABLE IF NOT EXISTS prediction_images (
        prediction_id TEXT NOT NULL REFERENCES predictions (id) ON DELETE CASCADE,
        n INTEGER NOT NULL,
        created_at {real} NOT NULL,
        model_name TEXT,
        model_version TEXT,
        label TEXT,
        score {real},
        input_kept {bool} NOT NULL DEFAULT {false},
        PRIMARY KEY (prediction_id, n))""",
    # image-level search: each index leads with the equality filters, then the page order (created_at, id), and
    # ends with the score, so a score filter is checked in the index without reading the table
    """CREATE INDEX IF NOT EXISTS prediction_images_created_at
        ON prediction_images (created_at, prediction_id, score)""",
    """CREATE INDEX IF NOT EXISTS prediction_images_label
        ON prediction_images (label, created_at, prediction_id, score)""",
    """CREATE INDEX IF NOT EXISTS prediction_images_model
        ON prediction_images (model_name, created_at, prediction_id, score)""",
    """CREATE INDEX IF NOT EXISTS prediction_images_model_label
        ON prediction_images (model_name, label, created_at, prediction_id, score)""",
    """CREATE TABLE IF NOT EXISTS prediction_inputs (
        prediction_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        kind TEXT NOT NULL,
        media_type TEXT NOT NULL,
        data {blob} NOT NULL,
        PRIMARY KEY (prediction_id, n),
        FOREIGN KEY (prediction_id, n) REFERENCES prediction_images (prediction_id, n) ON DELETE CASCADE)""",
]
# v2: each image's familiar flag (NULL: the model has no unfamiliar-input detector, or the row predates v2)
SCHEMA_V2 = [
    "ALTER TABLE prediction_images ADD COLUMN familiar {bool}",
    """CREATE INDEX IF NOT EXISTS prediction_images_familiar
        ON prediction_images (familiar, created_at, prediction_id, score)""",
]
MIGRATIONS = {1: SCHEMA_V1, 2: SCHEMA_V2}   # version → the statements that bring the one before up to it
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS audit_schema (version INTEGER NOT NULL)"

INSERT_PREDICTION = ("INSERT INTO predictions (id, created_at, model_name, model_version, route, latency_ms, "
                     "image_count, masks_kept, nbytes, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {json_param}) "
                     "ON CONFLICT DO NOTHING")
INSERT_IMAGE = ("INSERT INTO prediction_images (prediction_id, n, created_at, model_name, model_version, label, score, "
                "input_kept, familiar) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
INSERT_INPUT = ("INSERT INTO prediction_inputs (prediction_id, n, kind, media_type, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING")
SUMMARY_COLUMNS = "id, created_at, model_name, model_version, route, masks_kept"


class SqlBackend(Backend):
    """Shared implementation; see the module docstring."""

    placeholder: ClassVar[str] = "?"
    types: ClassVar[dict[str, str]]
    json_param: ClassVar[str] = "?"

    # ------------------------------------------------------------------ supplied by each backend

    def _reading(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _deleting(self) -> AbstractContextManager[Any]:
        """The transaction retention deletes in (PostgreSQL: a pooled connection, not the writer's)."""
        return self._transaction()

    def _load_json(self, value: Any) -> dict[str, Any]:
        return json.loads(value) if isinstance(value, str | bytes) else value

    # ------------------------------------------------------------------ helpers

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _rows(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur.execute(self._sql(sql), tuple(params))
        return list(cur.fetchall())

    def _schema_statements(self, version: int) -> list[str]:
        return [statement.format(**self.types) for statement in MIGRATIONS[version]]

    def _migrate(self, cur: Any) -> None:
        """Run inside a transaction that holds the backend's migration lock."""
        cur.execute(VERSION_TABLE)
        rows = self._rows(cur, "SELECT version FROM audit_schema")
        version = max((row[0] for row in rows), default=0)
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"the audit database has schema version {version}; this Macula knows up to "
                               f"{SCHEMA_VERSION}: upgrade Macula, or point it at another database")
        if version < 1:
            self._before_v1(cur)
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in self._schema_statements(step):
                cur.execute(statement)
        if version < SCHEMA_VERSION:
            cur.execute("DELETE FROM audit_schema")
            cur.execute(self._sql("INSERT INTO audit_schema (version) VALUES (?)"), (SCHEMA_VERSION,))

    def _before_v1(self, cur: Any) -> None:
        """Hook: bring a pre-versioning table up to the v1 columns (SQLite files from earlier releases)."""

    # ------------------------------------------------------------------ writes

    def write(self, rows: Sequence[EncodedRecord]) -> None:
        if not rows:
            return
        insert_prediction = self._sql(INSERT_PREDICTION.format(json_param=self.json_param))
        with self._transaction() as cur:
            cur.executemany(insert_prediction, [row.prediction_row() for row in rows])
            images = [image for row in rows for image in row.image_rows()]
            if images:
                cur.executemany(self._sql(INSERT_IMAGE), images)
            inputs = [kept for row in rows for kept in row.input_rows()]
            if inputs:
                cur.executemany(self._sql(INSERT_INPUT), inputs)

    # ------------------------------------------------------------------ reads

    def get(self, prediction_id: str) -> dict[str, Any] | None:
        with self._reading() as cur:
            rows = self._rows(cur, "SELECT record FROM predictions WHERE id = ?", (prediction_id,))
        return self._load_json(rows[0][0]) if rows else None

    def kept_input(self, prediction_id: str, n: int) -> KeptInput | None:
        with self._reading() as cur:
            rows = self._rows(cur, "SELECT media_type, data, kind FROM prediction_inputs WHERE prediction_id = ? "
                                   "AND n = ?", (prediction_id, n))
        return KeptInput(rows[0][0], bytes(rows[0][1]), rows[0][2]) if rows else None

    def search(self, filters: Filters, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
        check_limit(limit)
        after = None if cursor is None else decode_cursor(cursor)
        with self._reading() as cur:
            keys = self._rows(cur, *page_sql(filters, after, limit + 1))
            more = len(keys) > limit
            keys = keys[:limit]
            items = self._summaries(cur, [key[1] for key in keys])
        next_cursor = encode_cursor(float(keys[-1][0]), keys[-1][1]) if more else None
        return Page(items, next_cursor)

    def export(self, filters: Filters) -> Iterator[Summary]:
        cursor = None
        while True:
            page = self.search(filters, limit=EXPORT_PAGE, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def _summaries(self, cur: Any, ids: list[str]) -> list[Summary]:
        if not ids:
            return []
        predictions = self._rows(cur, f"SELECT {SUMMARY_COLUMNS} FROM predictions WHERE id IN {in_list(len(ids))}",
                                 ids)
        images: dict[str, list[ImageSummary]] = {}
        for pid, n, label, score, kept, familiar in self._rows(
                cur, f"SELECT prediction_id, n, label, score, input_kept, familiar FROM prediction_images "
                     f"WHERE prediction_id IN {in_list(len(ids))} ORDER BY prediction_id, n", ids):
            images.setdefault(pid, []).append(ImageSummary(int(n), label, None if score is None else float(score),
                                                           bool(kept), None if familiar is None else bool(familiar)))
        by_id = {row[0]: Summary(row[0], float(row[1]), row[2], row[3], row[4], bool(row[5]),
                                 tuple(images.get(row[0], ()))) for row in predictions}
        return [by_id[pid] for pid in ids if pid in by_id]   # a record deleted between the two reads is skipped

    # ------------------------------------------------------------------ retention

    def apply_retention(self, policy: RetentionPolicy, now: float) -> RetentionResult:
        result = RetentionResult()
        if policy.max_age_s is not None:
            result.deleted["age"] = self._delete_older(now - policy.max_age_s)
        if policy.max_records is not None:
            result.deleted["count"] = self._delete_beyond_count(policy.max_records)
        if policy.max_bytes is not None:
            result.deleted["bytes"] = self._delete_beyond_bytes(policy.max_bytes)
        return result

    def _delete_ids(self, cur: Any, ids: list[str]) -> int:
        if not ids:
            return 0
        cur.execute(self._sql(f"DELETE FROM predictions WHERE id IN {in_list(len(ids))}"), ids)
        return max(cur.rowcount, 0)

    def _oldest(self, cur: Any, limit: int, before: float | None = None) -> list[tuple]:
        where = "" if before is None else " WHERE created_at < ?"
        params = [] if before is None else [before]
        return self._rows(cur, f"SELECT id, nbytes FROM predictions{where} ORDER BY created_at, id LIMIT ?",
                          [*params, limit])

    def _delete_older(self, cutoff: float) -> int:
        deleted = 0
        while True:
            with self._deleting() as cur:
                chunk = self._oldest(cur, RETENTION_CHUNK, before=cutoff)
                deleted += self._delete_ids(cur, [row[0] for row in chunk])
            if len(chunk) < RETENTION_CHUNK:
                return deleted

    def _delete_beyond_count(self, max_records: int) -> int:
        with self._reading() as cur:
            excess = self._rows(cur, "SELECT COUNT(*) FROM predictions")[0][0] - max_records
        deleted = 0
        while excess > 0:
            with self._deleting() as cur:
                chunk = self._oldest(cur, min(excess, RETENTION_CHUNK))
                done = self._delete_ids(cur, [row[0] for row in chunk])
            deleted += done
            excess -= len(chunk)
            if not chunk:
                break
        return deleted

    def _delete_beyond_bytes(self, max_bytes: int) -> int:
        with self._reading() as cur:
            excess = int(self._rows(cur, "SELECT COALESCE(SUM(nbytes), 0) FROM predictions")[0][0]) - max_bytes
        deleted = 0
        while excess > 0:
            with self._deleting() as cur:
                chunk = self._oldest(cur, RETENTION_CHUNK)
                doomed = []
                for pid, nbytes in chunk:
                    if excess <= 0:
                        break
                    doomed.append(pid)
                    excess -= int(nbytes)
                deleted += self._delete_ids(cur, doomed)
            if not chunk:
                break
        return deleted
