"""``python -m training.study``: plain vs BAM vs CBAM on cluttered-mnist at an equal budget, several seeds.

    python -m training.study --out runs/study --seeds 0 1 2 --epochs 6 --nproc 2

Every run gets the same data, epochs, batch size and schedule; only the attention module and the
seed change. Each finished run is scored on the fixed test split with ``training.evaluate`` (top-1
and the per-module localisation score); the table (mean ± std over seeds, localisation averaged
over each stage's modules) goes to ``OUT/results.md`` and the raw numbers to ``OUT/study.json``.
Runs already finished in ``OUT`` are not trained again, so an interrupted study picks up where it
stopped (``--rescore`` evaluates them again).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .evaluate import parser as evaluate_parser
from .evaluate import run as evaluate_run

VARIANTS = ("none", "bam", "cbam")


def train_command(args: argparse.Namespace, attention: str, seed: int, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "training"] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
        "-m", "training"]
    return [*launcher, "--arch", args.arch, "--attention", attention, "--dataset", "cluttered-mnist",
            "--canvas-size", str(args.canvas_size), "--clutter", str(args.clutter), "--epochs", str(args.epochs),
            "--limit-train", str(args.limit_train), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--warmup-epochs", str(args.warmup_epochs), "--workers", "0", "--seed", str(seed), "--out", str(out),
            "--log-interval", "0"]


def run_one(args: argparse.Namespace, attention: str, seed: int) -> dict[str, Any]:
    out = Path(args.out) / f"{attention}-seed{seed}"
    report_path = out / "evaluation.json"
    if report_path.is_file() and not args.rescore:
        return json.loads(report_path.read_text())
    if not (out / "metrics.json").is_file() or "test" not in json.loads((out / "metrics.json").read_text()):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
        subprocess.run(train_command(args, attention, seed, out), check=True, env=env)
    report = evaluate_run(evaluate_parser().parse_args([str(out / "model.safetensors"), "--split", "test"]))
    metrics = json.loads((out / "metrics.json").read_text())
    report["train_seconds"] = sum(row["epoch_seconds"] for row in metrics["epochs"])
    report_path.write_text(json.dumps(report, indent=2))
    return report


def stage_of(module: str) -> str:
    """``layer2.1.cbam`` → ``layer2``; BAM's ``bam1`` sits after ``layer1``."""
    head = module.split(".")[0]
    return f"after layer{head[3:]}" if head.startswith("bam") else head


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def summarise(reports: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| attention | test top-1 % (mean ± std) | mask mass in box, per stage | pointing game, per stage "
             "| box share (uniform map) | train s/run |", "|---|---|---|---|---|---|"]
    for attention, runs in reports.items():
        mass, pointing = per_stage(runs, "localisation"), per_stage(runs, "pointing")
        seconds = statistics.mean(r["train_seconds"] for r in runs)
        lines.append(f"| {attention} | {mean_std([r['top1'] for r in runs])} | {mass} | {pointing} | "
                     f"{runs[0]['box_share']:.3f} | {seconds:.0f} |")
    return "\n".join(lines)


def per_stage(runs: list[dict[str, Any]], key: str) -> str:
    """``report[key]`` (module → score) averaged over each stage's modules and over the runs."""
    stages: dict[str, list[float]] = {}
    for report in runs:
        for module, score in report.get(key, {}).items():
            stages.setdefault(stage_of(module), []).append(score)
    return ", ".join(f"{stage} {statistics.mean(v):.3f}" for stage, v in stages.items()) or "—"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--attention", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--limit-train", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--canvas-size", type=int, default=48)
    p.add_argument("--clutter", type=int, default=4)
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun, gloo on CPU)")
    p.add_argument("--rescore", action="store_true", help="evaluate finished runs again (no retraining)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    reports: dict[str, list[dict[str, Any]]] = {a: [] for a in args.attention}
    for seed in args.seeds:  # seed by seed, so an interrupted study still compares every variant
        for attention in args.attention:
            reports[attention].append(run_one(args, attention, seed))
    table = summarise(reports)
    out = Path(args.out)
    (out / "study.json").write_text(json.dumps({"args": vars(args), "runs": reports}, indent=2))
    command = "python -m training.study " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "results.md").write_text(f"`{command}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
