"""Smoke test: bench/bench_models.py runs a tiny config and writes parseable JSON (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_models_tiny_config_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_models.py"), "--models", "resnet20", "resnet20+cbam",
           "--batch-sizes", "1", "--formats", "contiguous", "channels_last", "--iters", "1", "--warmup", "0",
           "--repeats", "1", "--size", "32", "--num-classes", "10", "--device", "cpu", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["format"]) for r in rows] == [
        ("resnet20", "contiguous"), ("resnet20+cbam", "contiguous"),
        ("resnet20", "channels_last"), ("resnet20+cbam", "channels_last")]
    for r in rows:
        assert r["batch"] == 1 and r["device"] == "cpu" and r["img_s"] > 0 and r["time_ratio"] > 0
    assert "resnet20+cbam" in result.stdout  # the human-readable table
