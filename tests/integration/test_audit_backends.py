"""Both audit backends, same tests: search filters against a reference, keyset paging (also under concurrent
writes and across equal timestamps), export, kept inputs, retention by age, count and bytes, replicas starting at
once on one fresh database, and a version-1 database migrated to the familiar column. PostgreSQL is a real
throwaway server (tests/integration/audit_pg.py)."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest

from service.audit import AuditStore, Filters, KeptInput, RetentionPolicy, open_backend
from service.audit.records import encode
from service.audit.sql import SCHEMA_V1, SCHEMA_VERSION, VERSION_TABLE

BACKENDS = ["sqlite", "postgresql"]
MODELS = [("demo", "aaaaaaaaaaaa"), ("demo", "bbbbbbbbbbbb"), ("other", "cccccccccccc")]
WITH_DETECTOR = {"bbbbbbbbbbbb", "cccccccccccc"}   # their images carry "familiar"; aaaaaaaaaaaa's do not
LABELS = ["cat", "dog", "3", "ünïcode"]


def at_once(target, backends: list) -> None:
    """``target(backend)`` for every backend, each on a thread of its own, all at once; wait for them (60 s)."""
    threads = [threading.Thread(target=target, args=(b,)) for b in backends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def backend(url):
    backend = open_backend(url)
    backend.open()
    yield backend
    backend.close()


def make_record(i: int, created_at: float, rng: random.Random) -> dict:
    name, version = MODELS[i % len(MODELS)]
    images = []
    for _ in range(1 + (i % 7 == 0) * 2):   # every 7th record has three images
        label = rng.choice(LABELS)
        score = round(rng.uniform(0.1, 1.0), 6)
        image = {"sha256": f"{i:064d}", "top_k": [{"index": LABELS.index(label), "label": label, "score": score}]}
        if version in WITH_DETECTOR:
            image["familiar"] = rng.random() < 0.7
            image["familiarity"] = round(rng.random(), 4)
        if i % 3 == 0:
            image["attention"] = [{"module": "layer1.0.cbam", "height": 2, "width": 2, "png": "iVBORw0KGgo="}]
        images.append(image)
    return {"id": f"{i:032x}", "created_at": created_at, "model": {"name": name, "version": version},
            "route": "/v1/predict", "latency_ms": 1.5, "images": images}


def dataset(n: int = 90, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    # every 10th record shares its timestamp with the one before: order falls back to the id
    return [make_record(i, 1_000_000.0 + (i - (i % 10 == 5)) * 10.0, rng) for i in range(n)]


def write(backend, records: list[dict], inputs=None) -> None:
    backend.write([encode(r, (inputs or {}).get(r["id"], ()), now=0.0) for r in records])


def matches(record: dict, f: Filters) -> bool:
    """The reference semantics of a search filter, in Python."""
    if f.model is not None and record["model"]["name"] != f.model:
        return False
    if f.version is not None and record["model"]["version"] != f.version:
        return False
    if f.since is not None and record["created_at"] < f.since:
        return False
    if f.until is not None and record["created_at"] >= f.until:
        return False
    if not f.image_level:
        return True
    return any((f.label is None or img["top_k"][0]["label"] == f.label)
               and (f.min_score is None or img["top_k"][0]["score"] >= f.min_score)
               and (f.max_score is None or img["top_k"][0]["score"] <= f.max_score)
               and (f.familiar is None or img.get("familiar") is f.familiar)   # no flag matches neither
               for img in record["images"])


def expected_ids(records: list[dict], f: Filters) -> list[str]:
    chosen = [r for r in records if matches(r, f)]
    return [r["id"] for r in sorted(chosen, key=lambda r: (r["created_at"], r["id"]), reverse=True)]


def all_pages(backend, f: Filters, limit: int) -> Iterator[list[str]]:
    cursor = None
    while True:
        page = backend.search(f, limit=limit, cursor=cursor)
        yield [s.id for s in page.items]
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


FILTERS = [
    Filters(),
    Filters(model="demo"),
    Filters(model="demo", version="bbbbbbbbbbbb"),
    Filters(version="cccccccccccc"),
    Filters(label="cat"),
    Filters(label="ünïcode", model="other"),
    Filters(max_score=0.4),
    Filters(min_score=0.5, max_score=0.7),
    Filters(label="dog", min_score=0.6),
    Filters(since=1_000_200.0, until=1_000_500.0),
    Filters(since=1_000_200.0, label="3", max_score=0.9),
    Filters(model="nobody"),
    Filters(label="cat", min_score=0.99, max_score=0.2),
    Filters(familiar=True),
    Filters(familiar=False),
    Filters(familiar=False, label="dog"),
    Filters(familiar=True, model="demo", max_score=0.5),
    Filters(familiar=False, version="aaaaaaaaaaaa"),   # no detector: nothing
    Filters(familiar=False, since=1_000_300.0),
]


def test_search_matches_the_reference_for_every_filter(backend):
    records = dataset()
    write(backend, records)
    for f in FILTERS:
        page = backend.search(f, limit=500)
        assert [s.id for s in page.items] == expected_ids(records, f), f
        assert page.next_cursor is None


def test_summaries_carry_what_the_issue_lists(backend):
    records = dataset(8)
    write(backend, records)
    (summary,) = backend.search(Filters(since=1_000_000.0, until=1_000_000.5), limit=10).items
    assert summary.to_json() == {
        "id": records[0]["id"], "created_at": 1_000_000.0, "model": {"name": "demo", "version": "aaaaaaaaaaaa"},
        "route": "/v1/predict", "image_count": 3, "masks_kept": True,
        "images": [{"n": n, "label": img["top_k"][0]["label"], "score": img["top_k"][0]["score"],
                    "input_kept": False} for n, img in enumerate(records[0]["images"])]}


def flagged(pid: str, created_at: float, version: str | None, images: list[tuple[str, bool | None]]) -> dict:
    """A record whose images have these (top-1 label, familiar flag); None: the image carries no flag."""
    entries = [{"top_k": [{"index": 0, "label": label, "score": 0.9}]}
               | ({} if familiar is None else {"familiar": familiar, "familiarity": 0.5 if familiar else 0.01})
               for label, familiar in images]
    return {"id": pid, "created_at": created_at, "model": {"name": "demo", "version": version},
            "route": "/v1/predict", "images": entries}


def test_familiar_filter_holds_for_one_image_and_skips_models_without_a_detector(backend):
    records = [flagged("a" * 32, 1.0, "det", [("cat", True), ("dog", False)]),
               flagged("b" * 32, 2.0, "det", [("cat", False)]),
               flagged("c" * 32, 3.0, "plain", [("cat", None), ("dog", None)]),
               flagged("d" * 32, 4.0, "det", [("dog", True)])]
    write(backend, records)
    a, b, c, d = (r["id"] for r in records)
    cases = {Filters(): [d, c, b, a], Filters(familiar=False): [b, a], Filters(familiar=True): [d, a],
             Filters(familiar=False, label="cat"): [b],   # a's cat is familiar, its unfamiliar image is a dog
             Filters(familiar=False, label="dog"): [a], Filters(familiar=True, label="cat"): [a],
             Filters(familiar=False, min_score=0.95): [], Filters(familiar=True, version="plain"): []}
    for f, expected in cases.items():
        assert [s.id for s in backend.search(f, limit=10).items] == expected == expected_ids(records, f), f
    summaries = {s.id: s.to_json() for s in backend.search(Filters(), limit=10).items}
    assert [i["familiar"] for i in summaries[a]["images"]] == [True, False]
    assert all("familiar" not in i for i in summaries[c]["images"])   # no detector: no flag, as in the record
    assert [s.id for s in backend.export(Filters(familiar=False))] == [b, a]


@pytest.mark.parametrize("limit", [1, 7, 50])
def test_pages_concatenate_to_the_full_result(backend, limit):
    records = dataset()
    write(backend, records)
    for f in (Filters(), Filters(label="cat"), Filters(max_score=0.6)):
        pages = list(all_pages(backend, f, limit))
        assert [pid for page in pages for pid in page] == expected_ids(records, f)
        assert all(len(page) == limit for page in pages[:-1])


def test_paging_is_stable_while_records_are_written(backend):
    records = dataset(60)
    write(backend, records)
    f = Filters(model="demo")
    expected = expected_ids(records, f)
    first = backend.search(f, limit=10)
    newer = [make_record(1000 + i, 2_000_000.0 + i, random.Random(i)) for i in range(30)]
    write(backend, newer)   # written between pages: newer than every page still to come
    seen = [s.id for s in first.items]
    cursor = first.next_cursor
    while cursor is not None:
        page = backend.search(f, limit=10, cursor=cursor)
        seen += [s.id for s in page.items]
        cursor = page.next_cursor
    assert seen == expected


def test_export_streams_the_whole_selection(backend, monkeypatch):
    import service.audit.sql as sql

    monkeypatch.setattr(sql, "EXPORT_PAGE", 9)   # several pages
    records = dataset()
    write(backend, records)
    f = Filters(label="dog")
    assert [s.id for s in backend.export(f)] == expected_ids(records, f)


def test_records_and_kept_inputs_come_back_exactly(backend):
    records = dataset(5)
    blob = bytes(range(256)) * 40   # every byte value, NULs included
    inputs = {records[0]["id"]: [KeptInput("image/jpeg", blob), None, KeptInput("image/png", b"\x89PNG", "original")]}
    write(backend, records, inputs)
    got = backend.get(records[0]["id"])
    assert got["images"][0]["top_k"] == records[0]["images"][0]["top_k"]
    assert got["images"][0]["input"] == {"kept": "thumbnail", "media_type": "image/jpeg", "bytes": len(blob)}
    assert backend.get(records[1]["id"]) == records[1]
    assert backend.kept_input(records[0]["id"], 0) == KeptInput("image/jpeg", blob)
    assert backend.kept_input(records[0]["id"], 1) is None
    assert backend.kept_input(records[0]["id"], 2) == KeptInput("image/png", b"\x89PNG", "original")
    summary = backend.search(Filters(until=1_000_000.5), limit=1).items[0]
    assert [i.input_kept for i in summary.images] == [True, False, True]
    write(backend, records[:1])   # the same id again is ignored, not an error
    assert backend.kept_input(records[0]["id"], 0).data == blob


def test_retention_by_age_count_and_bytes(backend):
    records = dataset(50)
    write(backend, records, {r["id"]: [KeptInput("image/jpeg", b"j" * 1000)] for r in records})
    newest_first = expected_ids(records, Filters())

    result = backend.apply_retention(RetentionPolicy(max_age_s=100.0, max_records=None), now=1_000_495.0)
    kept = [r for r in records if r["created_at"] >= 1_000_395.0]
    assert result.deleted == {"age": 50 - len(kept), "count": 0, "bytes": 0}
    assert [s.id for s in backend.search(Filters(), limit=500).items] == newest_first[:len(kept)]

    result = backend.apply_retention(RetentionPolicy(max_age_s=None, max_records=6), now=0.0)
    assert result.deleted["count"] == len(kept) - 6
    assert [s.id for s in backend.search(Filters(), limit=500).items] == newest_first[:6]
    assert backend.kept_input(newest_first[6], 0) is None   # inputs go with their record

    sizes = {r["id"]: encode(r, [KeptInput("image/jpeg", b"j" * 1000)], 0.0).nbytes for r in records}
    budget = sum(sizes[pid] for pid in newest_first[:4]) + 1
    result = backend.apply_retention(RetentionPolicy(max_age_s=None, max_records=None, max_bytes=budget), now=0.0)
    assert result.deleted["bytes"] == 2
    assert [s.id for s in backend.search(Filters(), limit=500).items] == newest_first[:4]


def test_store_retention_thread_prunes_on_its_own(url):
    store = AuditStore(url, max_records=3, max_age_s=None, retention_interval_s=0.2)
    store.start()
    try:
        for r in dataset(10):
            store.submit(r)
        assert store.flush(timeout=10)
        deadline = time.monotonic() + 10
        while len(store.search(Filters(), limit=50).items) > 3:
            assert time.monotonic() < deadline, "retention never ran"
            time.sleep(0.1)
        assert [s.id for s in store.search(Filters(), limit=50).items] == expected_ids(dataset(10), Filters())[:3]
    finally:
        store.close(timeout=10)


def test_replicas_starting_at_once_migrate_one_fresh_database(url):
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    backends = [open_backend(url) for _ in range(6)]

    def start(backend) -> None:
        try:
            barrier.wait(timeout=10)
            backend.open()
            write(backend, [make_record(backends.index(backend), 5.0 + backends.index(backend), random.Random(0))])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    at_once(start, backends)
    try:
        assert errors == []
        assert len(backends[0].search(Filters(), limit=50).items) == 6
        with backends[0]._reading() as cur:
            assert backends[0]._rows(cur, "SELECT version FROM audit_schema") == [(SCHEMA_VERSION,)]
    finally:
        for backend in backends:
            backend.close()


@contextlib.contextmanager
def raw_database(url: str) -> Iterator[tuple[object, str]]:
    """A plain DB-API cursor on the store's database (no migration) and its placeholder."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            yield conn.cursor(), "?"
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            yield conn.cursor(), "%s"


def make_version_1_database(url: str, records: list[dict]) -> None:
    """The tables and rows a Macula with schema version 1 wrote: no familiar column (the flag only in the JSON)."""
    types = open_backend(url).types
    with raw_database(url) as (cur, mark):
        cur.execute(VERSION_TABLE)
        for statement in SCHEMA_V1:
            cur.execute(statement.format(**types))
        cur.execute(f"INSERT INTO audit_schema (version) VALUES ({mark})", (1,))
        json_mark = mark if mark == "?" else f"{mark}::jsonb"
        for record in records:
            row = encode(record, (), now=0.0)
            cur.execute("INSERT INTO predictions (id, created_at, model_name, model_version, route, latency_ms, "
                        f"image_count, masks_kept, nbytes, record) VALUES ({', '.join([mark] * 9)}, {json_mark})",
                        row.prediction_row())
            for image in row.image_rows():
                cur.execute("INSERT INTO prediction_images (prediction_id, n, created_at, model_name, model_version, "
                            f"label, score, input_kept) VALUES ({', '.join([mark] * 8)})", image[:8])


def test_a_version_1_database_migrates_and_its_old_rows_have_no_flag(url):
    old = flagged("0" * 32, 1.0, "det", [("cat", False)])   # the flag is in its JSON, but no column held it
    make_version_1_database(url, [old])
    backends = [open_backend(url) for _ in range(4)]
    barrier = threading.Barrier(len(backends))
    errors: list[BaseException] = []

    def start(backend) -> None:
        try:
            barrier.wait(timeout=10)
            backend.open()   # replicas upgrading one old database at once: one adds the column, the rest see it
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    at_once(start, backends)
    backend = backends[0]
    try:
        assert errors == []
        with backend._reading() as cur:
            assert backend._rows(cur, "SELECT version FROM audit_schema") == [(SCHEMA_VERSION,)]
            assert backend._rows(cur, "SELECT prediction_id, familiar FROM prediction_images") == [(old["id"], None)]
        new = flagged("1" * 32, 2.0, "det", [("cat", False)])
        write(backend, [new])
        assert [s.id for s in backend.search(Filters(familiar=False), limit=10).items] == [new["id"]]
        assert [s.id for s in backend.search(Filters(familiar=True), limit=10).items] == []
        assert [s.id for s in backend.search(Filters(label="cat"), limit=10).items] == [new["id"], old["id"]]
        assert backend.get(old["id"]) == old   # the record itself is untouched
    finally:
        for each in backends:
            each.close()
