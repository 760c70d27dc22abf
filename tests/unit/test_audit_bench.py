"""The audit benchmarks' own logic: the search benchmark runs end to end on a small SQLite store, and the cost
benchmark compares each configuration with auditing off at the same concurrency."""

from __future__ import annotations

import math

from bench import audit_cost, audit_search


def test_search_benchmark_fills_and_times_every_query(tmp_path):
    report = audit_search.main(["--url", f"sqlite:///{tmp_path / 'a.db'}", "--records", "600", "--repeat", "1",
                                "--out", str(tmp_path / "out")])
    assert report["records"] == 600 and (tmp_path / "out" / "sqlite.json").is_file()
    rows = {(r["query"], r["page"]): r for r in report["rows"]}
    assert len(rows) == 2 * len(audit_search.queries())
    assert rows[("no filter", 1)]["items"] == 50 and rows[("no filter", 11)]["items"] == 50
    assert rows[("no match: unknown label", 1)]["items"] == 0
    assert math.isnan(rows[("no match: unknown label", 11)]["median_ms"])   # there is no 11th page
    assert all(r["median_ms"] >= 0 for r in report["rows"] if r["items"])


def test_search_benchmark_records_look_like_the_services():
    import random

    record = audit_search.make_record(5, 10, random.Random(0))
    assert len(record["id"]) == 32 and record["model"]["name"] in {m for m, _ in audit_search.MODELS}
    for image in record["images"]:
        scores = [t["score"] for t in image["top_k"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1


def test_cost_is_measured_against_audit_off_at_the_same_concurrency():
    labels = audit_cost.configurations("postgresql://u@h/db")
    assert labels["off"] == audit_cost.OFF and "postgresql durable" in labels
    assert "postgresql durable" not in audit_cost.configurations(None)
    summary = [{"config": audit_cost.OFF, "concurrency": 32, "req_per_s": 100.0, "p50_ms": 10.0, "p99_ms": 40.0},
               {"config": labels["sqlite durable"], "concurrency": 32, "req_per_s": 92.0, "p50_ms": 11.0,
                "p99_ms": 45.0},
               {"config": labels["sqlite durable"], "concurrency": 1, "req_per_s": 30.0, "p50_ms": 3.0,
                "p99_ms": 5.0}]
    rows = {(r["label"], r["concurrency"]): r for r in audit_cost.costs(summary, labels)}
    assert math.isclose(rows[("sqlite durable", 32)]["throughput_cost"], 0.08)
    assert rows[("sqlite durable", 32)]["p99_delta_ms"] == 5.0
    assert rows[("sqlite durable", 1)]["throughput_cost"] is None   # no "off" run at that concurrency
    table = audit_cost.markdown([{**r, "errors": 0} for r in rows.values()])
    assert "| sqlite durable | 32 | 92.0 | +8.0 % |" in table
