"""CI smoke test of the serving benchmark: one tiny end-to-end run through real processes and wrk.

It proves that the pipeline works and that its JSON parses; it asserts no speed.
"""

from __future__ import annotations

import json
import socket

import pytest

from bench.run_serving import main


def _free_port_base(step: int = 10, count: int = 2) -> int:
    """A port p such that p, p + step, ... are free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + step * count > 65535:
            continue
        try:
            for i in range(count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + step * i))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_serving_run_writes_parseable_results(tmp_path):
    main(["--models", "resnet20", "--servers", "naive,macula", "--concurrency", "1", "--duration", "1",
          "--warmup", "0", "--raw-batch-sizes", "1,2", "--raw-time", "0.05", "--out", str(tmp_path),
          "--port", str(_free_port_base())])
    report = json.loads((tmp_path / "serving.json").read_text())
    assert report["failures"] == []
    assert {(r["server"], r["concurrency"]) for r in report["rows"]} == {("naive", 1), ("macula", 1)}
    model = report["models"]["resnet20"]
    assert model["physical_limit_img_per_s"] > 0 and model["decode_ms"] > 0
    for row in report["rows"]:
        assert row["requests"] > 0 and row["error_count"] == 0
        assert row["top1"] == model["reference_top1"]  # each server answers like the model run directly
        assert row["x_limit"] > 0 and set(row["x_peer"]) == {"naive", "macula"} - {row["server"]}
        assert row["precision"] in model["limits"] and row["x_own_limit"] > 0  # Macula's precision was measured
    macula = next(r for r in report["rows"] if r["server"] == "macula")
    assert f"| macula | resnet20 | {macula['precision']} | 1 |" in (tmp_path / "serving.md").read_text()
