"""torchrun with 2 processes (gloo on CPU) trains on a tiny subset and writes a loadable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from models import load_checkpoint


def test_two_process_torchrun_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training", "--arch", "resnet20", "--attention", "bam", "--dataset", "cluttered-mnist",
               "--canvas-size", "32", "--clutter", "2", "--limit-train", "64", "--limit-val", "20",
               "--batch-size", "16", "--epochs", "1", "--workers", "0", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    model, meta = load_checkpoint(out / "model.safetensors")
    assert meta.arch["attention"] == "bam" and meta.training["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1
    # val (20 images) is sharded 10 + 10 over the ranks and summed back: accuracy is a multiple of 1/20
    assert round(metrics["epochs"][0]["val_acc"] * 20, 6).is_integer()
    assert metrics["test"]["n"] == 20
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries behind
