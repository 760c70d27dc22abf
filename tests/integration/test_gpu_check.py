"""bench/gpu_check.sh --dry-run: every step of the GPU check runs on a CPU and writes its JSON and markdown summary
(the real run needs a GPU; this proves it is ready to run). It asserts no speed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.e2e
def test_the_gpu_check_dry_run_passes_every_step(tmp_path):
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=290)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["ok"]
    steps = report["steps"]
    assert list(steps) == ["cuda_tests", "raw_sweep", "nvjpeg", "serving", "oom_split"]
    assert all(step["status"] == "ok" for step in steps.values()), steps
    assert steps["raw_sweep"]["rows"] and all(r["img_per_s"] > 0 for r in steps["raw_sweep"]["rows"])
    assert steps["nvjpeg"]["top1_agree"]  # both decoders feed the model the same picture
    assert [r["error_count"] for r in steps["serving"]["rows"]] == [0]
    oom = steps["oom_split"]
    assert oom["batches_run"][0] == oom["batch"] and len(oom["batches_run"]) > 1  # the full batch was split
    assert not oom["failed_images"] and oom["max_score_difference"] <= 1e-3
    assert "| oom_split | ok |" in (tmp_path / "gpu_check.md").read_text()
