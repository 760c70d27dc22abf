"""Audit search at scale: fill a store with N records (default 1 million) and time filtered pages.

The records look like the service's (one image, sometimes three; top-5 lists; three models, two versions each;
a 10-class and a 1000-class label set; top-1 scores mostly confident, a few percent under 0.5), spread over 30
days, and are written through the backend's own group-commit path. Each query is one page of 50 summaries
(``GET /v1/predictions`` without the HTTP layer), timed first page and 10 pages deep, repeated; medians and
95th percentiles are reported in milliseconds.

    python -m bench.audit_search                                        # SQLite, 1M records, in a temp dir
    python -m bench.audit_search --url postgresql://u:p@127.0.0.1:5432/bench
    python -m bench.audit_search --throwaway-postgres                   # a server of its own (initdb, as the tests)
    python -m bench.audit_search --records 20000 --repeat 3             # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from service.audit import Filters, open_backend
from service.audit.records import encode

DAY = 86400.0
START = 1_764_000_000.0
MODELS = [("demo", "1579aaf23fc4"), ("demo", "2b9e0c55d1a7"), ("resnet50", "9c1d7e3a4b20"),
          ("resnet50", "0aa4f6c9e812"), ("screening", "77e0b1d4c3f9"), ("screening", "c4d5e6f7a8b9")]
DIGITS = [str(i) for i in range(10)]
IMAGENET = [f"n{i:08d}" for i in range(1000)]
FILL_CHUNK = 2000


def labels_for(model: str) -> list[str]:
    return IMAGENET if model == "resnet50" else DIGITS


def make_record(i: int, n: int, rng: random.Random) -> dict:
    name, version = MODELS[i % len(MODELS)]
    labels = labels_for(name)
    images = []
    for _ in range(3 if rng.random() < 0.1 else 1):
        score = rng.betavariate(8, 1.2) if rng.random() > 0.05 else rng.uniform(0.05, 0.5)
        picks = rng.sample(range(len(labels)), 5)
        rest = (1 - score) / 4
        top = [{"index": picks[0], "label": labels[picks[0]], "score": round(score, 6)}]
        top += [{"index": p, "label": labels[p], "score": round(rest * 0.9 ** k, 6)} for k, p in enumerate(picks[1:])]
        images.append({"sha256": f"{rng.getrandbits(256):064x}", "bytes": 48213, "width": 640, "height": 480,
                       "top_k": top})
    return {"id": f"{rng.getrandbits(128):032x}", "created_at": START + 30 * DAY * i / n,
            "model": {"name": name, "version": version, "precision": "float32"}, "route": "/v1/predict",
            "latency_ms": round(rng.uniform(5, 40), 3), "images": images}


def fill(backend, n: int, seed: int) -> float:
    """Write ``n`` records in group commits of FILL_CHUNK; returns seconds taken."""
    rng = random.Random(seed)
    started = time.perf_counter()
    for first in range(0, n, FILL_CHUNK):
        rows = [encode(make_record(i, n, rng), (), 0.0) for i in range(first, min(n, first + FILL_CHUNK))]
        backend.write(rows)
        if (first // FILL_CHUNK) % 50 == 0:
            print(f"  filled {first + len(rows):,} / {n:,} ({time.perf_counter() - started:.0f} s)", flush=True)
    return time.perf_counter() - started


def queries() -> dict[str, Filters]:
    mid = START + 15 * DAY
    return {
        "no filter": Filters(),
        "model": Filters(model="resnet50"),
        "model + version": Filters(model="demo", version="2b9e0c55d1a7"),
        "label (1 in 10)": Filters(label="7"),
        "label (1 in 1000)": Filters(label="n00000042"),
        "model + label": Filters(model="resnet50", label="n00000042"),
        "unsure: max_score 0.5": Filters(max_score=0.5),
        "model + unsure": Filters(model="screening", max_score=0.5),
        "model + label + unsure": Filters(model="demo", label="3", max_score=0.5),
        "one day": Filters(since=mid, until=mid + DAY),
        "one day + label": Filters(since=mid, until=mid + DAY, label="7"),
        "yesterday's unsure of one model": Filters(model="demo", max_score=0.5, since=START + 28 * DAY,
                                                   until=START + 29 * DAY),
        "no match: unknown label": Filters(label="no-such-label"),
        "rare scores only (worst case)": Filters(min_score=0.05, max_score=0.051),
    }


def time_page(backend, f: Filters, *, limit: int, depth: int) -> tuple[float, int]:
    """Milliseconds for the page ``depth`` pages in (the ones before it are fetched untimed) and its length."""
    cursor = None
    for _ in range(depth):
        page = backend.search(f, limit=limit, cursor=cursor)
        cursor = page.next_cursor
        if cursor is None:
            return float("nan"), 0
    started = time.perf_counter()
    page = backend.search(f, limit=limit, cursor=cursor)
    return 1000 * (time.perf_counter() - started), len(page.items)


def measure(backend, *, limit: int, repeat: int) -> list[dict]:
    rows = []
    for name, f in queries().items():
        for depth in (0, 10):
            times, count = [], 0
            for _ in range(repeat):
                ms, count = time_page(backend, f, limit=limit, depth=depth)
                times.append(ms)
            times.sort()
            p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
            rows.append({"query": name, "page": depth + 1, "items": count, "median_ms": statistics.median(times),
                         "p95_ms": p95})
            print(f"  {name:34s} page {depth + 1:2d}: {count:3d} items, median {rows[-1]['median_ms']:7.2f} ms, "
                  f"p95 {p95:7.2f} ms", flush=True)
    return rows


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment() -> dict:
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@contextlib.contextmanager
def store_url(args: argparse.Namespace) -> Iterator[str]:
    if args.url:
        yield args.url
    elif args.throwaway_postgres:
        from tests.integration.audit_pg import postgres_cluster

        with postgres_cluster() as cluster:
            yield cluster.create_database()
    else:
        with tempfile.TemporaryDirectory(prefix="macula-audit-bench-") as tmp:
            yield f"sqlite:///{tmp}/audit.db"


def markdown(rows: list[dict]) -> str:
    lines = ["| query | page | items | median ms | p95 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['query']} | {r['page']} | {r['items']} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="audit store URL (default: a new SQLite file in a temp dir)")
    p.add_argument("--throwaway-postgres", action="store_true", help="start a PostgreSQL server of its own")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/out/audit_search"))
    args = p.parse_args(argv)
    with store_url(args) as url:
        backend = open_backend(url)
        backend.open()
        try:
            print(f"filling {args.records:,} records into {backend.name} ...", flush=True)
            fill_s = fill(backend, args.records, args.seed)
            backend.analyze()
            print(f"filled in {fill_s:.0f} s; timing pages of {args.limit}", flush=True)
            env = environment()
            rows = measure(backend, limit=args.limit, repeat=args.repeat)
        finally:
            backend.close()
    report = {"backend": backend.name, "records": args.records, "limit": args.limit, "repeat": args.repeat,
              "fill_s": fill_s, "environment": env, "environment_after": environment(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{backend.name}.json").write_text(json.dumps(report, indent=1))
    print(f"\n{env['cpu']}, {env['cpus']} CPUs; load before {env['loadavg']}, after "
          f"{report['environment_after']['loadavg']}\n{markdown(rows)}")
    return report


if __name__ == "__main__":
    main()
