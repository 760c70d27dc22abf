"""``python -m training.study``: plain vs BAM vs CBAM to convergence, on two cluttered-mnist tasks, several seeds.

    python -m training.study --out runs/study --jobs 2                   # the whole study (docs/results.md)
    python -m training.study --out runs/study --tasks mnist48 --seeds 0 --runs cbam:official none:official
    python -m training.study --out runs/study --report                   # tables from the runs finished so far

Tasks (``TASKS``): ``mnist48`` is the demo model's task and budget (48×48, 4 fragments, 15 epochs, the
``make demo-model`` recipe); ``hard`` a larger canvas with more clutter, where the digit is a smaller share of the
image; ``hard96`` (only when named) larger and more cluttered again. On ``mnist48`` BAM and CBAM run with both
initialisations (``models.initialisation``), the plain network with the authors'; on ``hard`` and ``hard96`` every
attention with ``--hard-init``. Within a task only the attention, the init and the seed change (seed: init, data
order, training canvases); validation and test canvases are the same for every run.

Each finished run is scored on the fixed test split with ``training.evaluate`` (top-1, the localisation
score and pointing game per module); the tables (mean ± std over seeds, localisation averaged over each
stage's modules, training images/s) go to ``OUT/results.md`` and the raw numbers to ``OUT/study.json``.
Runs already finished in ``OUT/<task>/<attention>-<init>-s<seed>`` are not trained again, so an interrupted
study picks up where it stopped (``--rescore`` evaluates them again).

``--jobs N`` trains N runs side by side, each process with ``cores // (N × processes)`` threads: how the ``hard``
task's one-process runs keep 2 cores busy (together about as many images per second as one two-process DDP run of
the same network, docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .evaluate import parser as evaluate_parser
from .evaluate import run as evaluate_run

ATTENTIONS = ("none", "bam", "cbam")
INITS = ("macula", "official")


@dataclass(frozen=True)
class Task:
    canvas_size: int
    clutter: int
    epochs: int
    limit_train: int | None = None  # training digits used (None: all 4,000)
    batch_size: int = 64  # per process; × 2 processes = the demo's global batch 128
    processes: int = 2  # per run (torchrun, gloo on CPU); ``--nproc`` overrides
    lr: float = 0.1
    warmup_epochs: float = 1.0


# ``hard`` learns by optimiser steps, not images: at the demo's global batch of 128 (31 steps an epoch) every
# network sat at chance for its first 4-5 epochs, so it trains one process with batch 32 (125 steps an epoch), two
# runs side by side (``--jobs 2``); 15 epochs of all digits fit its 9 runs in about 1.5 hours of 2 idle cores.
TASKS = {"mnist48": Task(canvas_size=48, clutter=4, epochs=15),
         "hard": Task(canvas_size=64, clutter=16, epochs=15, batch_size=32, processes=1),
         # Not in the study by default: a probe past ``hard``, where the plain network read the digit as well as on
         # ``mnist48``; the digit's box is 3.4 % of the canvas (7.7 % on ``hard``). About twice ``hard``'s time a run.
         "hard96": Task(canvas_size=96, clutter=32, epochs=15, batch_size=32, processes=1)}
STUDY_TASKS = ("mnist48", "hard")


def run_dir(out: Path, task: str, attention: str, init: str, seed: int) -> Path:
    return out / task / f"{attention}-{init}-s{seed}"


def processes(args: argparse.Namespace, task: Task) -> int:
    return args.nproc or task.processes


def train_command(args: argparse.Namespace, task: Task, attention: str, init: str, seed: int, out: Path
                  ) -> list[str]:
    nproc = processes(args, task)
    launcher = [sys.executable, "-m", "training"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "training"]
    limit_train = args.limit_train or task.limit_train
    limit = ["--limit-train", str(limit_train)] if limit_train else []
    return [*launcher, "--arch", "resnet20", "--attention", attention, "--init", init, "--dataset", "cluttered-mnist",
            "--canvas-size", str(task.canvas_size), "--clutter", str(task.clutter),
            "--epochs", str(args.epochs or task.epochs), *limit, "--batch-size", str(task.batch_size),
            "--lr", str(task.lr), "--warmup-epochs", str(task.warmup_epochs), "--workers", "0", "--seed", str(seed),
            "--out", str(out), "--log-interval", "0"]


def finished(out: Path) -> bool:
    metrics = out / "metrics.json"
    return metrics.is_file() and "test" in json.loads(metrics.read_text())


def score(out: Path, rescore: bool = False) -> dict[str, Any]:
    """``training.evaluate``'s report on the test split, plus training time and speed from ``metrics.json``."""
    path = out / "evaluation.json"
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    if path.is_file() and not rescore:
        return json.loads(path.read_text()) | learning_speed(epochs)
    report = evaluate_run(evaluate_parser().parse_args([str(out / "model.safetensors"), "--split", "test"]))
    report["epochs"] = len(epochs)
    report["train_seconds"] = sum(row["epoch_seconds"] for row in epochs)
    report["train_img_per_s"] = statistics.median(row["img_per_s"] for row in epochs)
    path.write_text(json.dumps(report, indent=2))
    return report | learning_speed(epochs)


def learning_speed(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """The validation curve, and the first epoch (1-based) at 90 % validation accuracy (None: never)."""
    curve = [row["val_acc"] for row in epochs]
    return {"val_curve": curve, "epoch_to_90": next((i + 1 for i, acc in enumerate(curve) if acc >= 0.9), None)}


def threads_per_process(args: argparse.Namespace, task: Task) -> int:
    return max(1, (os.cpu_count() or 1) // (args.jobs * processes(args, task)))


def train(args: argparse.Namespace, task: Task, attention: str, init: str, seed: int, out: Path) -> None:
    env = {"OMP_NUM_THREADS": str(threads_per_process(args, task)), **os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    subprocess.run(train_command(args, task, attention, init, seed, out), check=True, env=env)


# -------------------------------------------------------------------------------------------- tables


def stage_of(module: str) -> str:
    """``layer2.1.cbam`` → ``layer2``; BAM's ``bam1`` sits after ``layer1``."""
    head = module.split(".")[0]
    return f"after layer{head[3:]}" if head.startswith("bam") else head


def mean_std(values: list[float], scale: float = 100.0) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.2f} ± {scale * spread:.2f}"


def per_stage(runs: list[dict[str, Any]], key: str) -> str:
    """``report[key]`` (module → score) averaged over each stage's modules and over the runs."""
    stages: dict[str, list[float]] = {}
    for report in runs:
        for module, value in report.get(key, {}).items():
            stages.setdefault(stage_of(module), []).append(value)
    return ", ".join(f"{stage} {statistics.mean(v):.3f}" for stage, v in stages.items()) or "—"


def summarise(reports: dict[str, list[dict[str, Any]]]) -> str:
    """One row per ``attention/init``: top-1 mean ± std, localisation per stage, seeds, epochs, the epoch each
    seed first reached 90 % on validation, img/s."""
    lines = ["| attention / init | seeds | test top-1 % (mean ± std) | mask mass in box, per stage | pointing game, "
             "per stage | box share | epochs | first epoch at 90 % val | train img/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, runs in reports.items():
        if not runs:
            continue
        epochs = "/".join(sorted({str(r.get("epochs", "?")) for r in runs}))
        speed = statistics.mean(r.get("train_img_per_s", 0.0) for r in runs)
        to_90 = ", ".join(str(r.get("epoch_to_90") or "—") for r in runs)
        lines.append(f"| {arm} | {len(runs)} | {mean_std([r['top1'] for r in runs])} | "
                     f"{per_stage(runs, 'localisation')} | {per_stage(runs, 'pointing')} | "
                     f"{runs[0]['box_share']:.3f} | {epochs} | {to_90} | {speed:.0f} |")
    return "\n".join(lines)


def describe(task: Task, args: argparse.Namespace) -> str:
    limit_train = args.limit_train or task.limit_train
    digits = f"{limit_train:,} of the 4,000 training digits" if limit_train else "all 4,000 training digits"
    return (f"{task.canvas_size}×{task.canvas_size} canvas, {task.clutter} fragments, {args.epochs or task.epochs} "
            f"epochs, {digits}, batch {task.batch_size} × {processes(args, task)} process(es), lr {task.lr} cosine, "
            f"{task.warmup_epochs:g} warmup epoch(s)")


# ---------------------------------------------------------------------------------------------- plan


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """``(task, attention, init, seed)`` in the order to run: seed by seed, so a cut-short study compares all arms."""
    # The init question is the attention modules' (CBAM's zero spatial-gate BN): plain runs with the authors' init only.
    first = [("none", "official")] + [(a, i) for a in ATTENTIONS if a != "none" for i in INITS]
    arms = {task: first if task == "mnist48" else [(a, args.hard_init) for a in ATTENTIONS] for task in TASKS}
    if args.runs:
        wanted = [tuple(r.split(":")) for r in args.runs]
        arms = {task: [arm for arm in wanted if arm in task_arms] for task, task_arms in arms.items()}
    return [(task, attention, init, seed) for task in args.tasks for seed in args.seeds
            for attention, init in arms[task]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(STUDY_TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", metavar="ATTENTION:INIT", help="only these arms, e.g. cbam:official")
    p.add_argument("--hard-init", choices=INITS, default="official", help="the init used on the hard task")
    p.add_argument("--epochs", type=int, help="override every task's epochs (state it with the results)")
    p.add_argument("--limit-train", type=int, help="train on this many of the 4,000 digits (state it)")
    p.add_argument("--nproc", type=int, help="processes per run (torchrun, gloo on CPU); default the task's")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side")
    p.add_argument("--report", action="store_true", help="only tabulate the runs already finished")
    p.add_argument("--rescore", action="store_true", help="evaluate finished runs again (no retraining)")
    return p


def train_missing(args: argparse.Namespace, out: Path, planned: list[tuple[str, str, str, int]]) -> None:
    """Train the planned runs not finished yet, ``args.jobs`` at a time, in plan order. A failed run raises once
    the runs under way end, and no further run starts."""
    missing = [(TASKS[task], attention, init, seed, run_dir(out, task, attention, init, seed))
               for task, attention, init, seed in planned if not finished(run_dir(out, task, attention, init, seed))]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = [pool.submit(train, args, *run) for run in missing]
        try:
            for run in runs:
                run.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    planned = plan(args)
    if not args.report:
        train_missing(args, out, planned)
    reports: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task, attention, init, seed in planned:
        run = run_dir(out, task, attention, init, seed)
        if finished(run):
            reports.setdefault(task, {}).setdefault(f"{attention} / {init}", []).append(score(run, args.rescore))
    tables = {task: summarise(arms) for task, arms in reports.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"args": vars(args), "runs": reports}, indent=2))
    command = "python -m training.study " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n\n".join(f"### {task}: {describe(TASKS[task], args)}\n\n{table}" for task, table in tables.items())
    (out / "results.md").write_text(f"`{command}`\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
