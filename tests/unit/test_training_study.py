"""The study's plan, training commands and tables (no training: finished runs are faked on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import study


def test_plan_runs_seed_by_seed_with_both_inits_on_the_first_task_only() -> None:
    args = study.parser().parse_args(["--seeds", "0", "1"])
    planned = study.plan(args)
    first = [p for p in planned if p[0] == "mnist48"]
    assert len(first) == 5 * 2 and [p[3] for p in first] == [0] * 5 + [1] * 5
    assert {(a, i) for _, a, i, _ in first} == {("none", "official")} | {
        (a, i) for a in ("bam", "cbam") for i in study.INITS}
    assert {(a, i) for t, a, i, _ in planned if t == "hard"} == {(a, "official") for a in study.ATTENTIONS}
    assert {t for t, *_ in planned} == {"mnist48", "hard"}  # hard96 only when named
    probe = study.plan(study.parser().parse_args(["--tasks", "hard96", "--seeds", "0", "--hard-init", "macula"]))
    assert probe == [("hard96", a, "macula", 0) for a in study.ATTENTIONS]
    only = study.plan(study.parser().parse_args(["--tasks", "mnist48", "--seeds", "0", "--runs", "cbam:macula"]))
    assert only == [("mnist48", "cbam", "macula", 0)]


def test_train_command_is_the_demo_recipe_on_the_first_task(tmp_path: Path) -> None:
    args = study.parser().parse_args([])
    command = study.train_command(args, study.TASKS["mnist48"], "cbam", "official", 2, tmp_path)
    flags = dict(zip(command[command.index("--arch"):][::2], command[command.index("--arch") + 1:][::2],
                     strict=True))
    assert command[:7][-3:] == ["--nproc_per_node", "2", "-m"]
    assert flags | {"--out": None} == {
        "--arch": "resnet20", "--attention": "cbam", "--init": "official", "--dataset": "cluttered-mnist",
        "--canvas-size": "48", "--clutter": "4", "--epochs": "15", "--batch-size": "64", "--lr": "0.1",
        "--warmup-epochs": "1.0", "--workers": "0", "--seed": "2", "--out": None, "--log-interval": "0"}
    limited = study.parser().parse_args(["--epochs", "3", "--limit-train", "1000", "--nproc", "1"])
    command = study.train_command(limited, study.TASKS["hard"], "none", "macula", 0, tmp_path)
    assert command[1:3] == ["-m", "training"]
    assert "--limit-train" in command and command[command.index("--epochs") + 1] == "3"
    assert command[command.index("--canvas-size") + 1] == "64"
    hard = study.train_command(args, study.TASKS["hard"], "cbam", "official", 0, tmp_path)
    assert hard[1:3] == ["-m", "training"] and "--limit-train" not in hard  # one process, every digit
    assert hard[hard.index("--batch-size") + 1] == "32" and hard[hard.index("--epochs") + 1] == "15"


def test_jobs_share_the_cores_between_the_processes_they_start(monkeypatch) -> None:
    monkeypatch.setattr(study.os, "cpu_count", lambda: 2)
    two_jobs = study.parser().parse_args(["--jobs", "2"])
    assert study.threads_per_process(two_jobs, study.TASKS["hard"]) == 1
    assert study.threads_per_process(study.parser().parse_args([]), study.TASKS["hard"]) == 2
    assert study.threads_per_process(two_jobs, study.TASKS["mnist48"]) == 1  # never 0


def fake_run(out: Path, top1: float, *, module: str = "layer3.0.cbam") -> None:
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"test": {"acc": top1}, "epochs": [
        {"epoch_seconds": 10.0, "img_per_s": 100.0, "val_acc": 0.5},
        {"epoch_seconds": 12.0, "img_per_s": 120.0, "val_acc": top1 - 0.03}]}))
    (out / "evaluation.json").write_text(json.dumps({
        "top1": top1, "box_share": 0.137, "localisation": {module: 0.2}, "pointing": {module: 0.9},
        "epochs": 2, "train_img_per_s": 110.0}))


def test_report_tabulates_finished_runs_mean_and_std(tmp_path: Path, capsys) -> None:
    for seed, top1 in enumerate((0.97, 0.99)):
        fake_run(study.run_dir(tmp_path, "mnist48", "cbam", "official", seed), top1)
    fake_run(study.run_dir(tmp_path, "mnist48", "none", "official", 0), 0.98)
    assert study.main(["--out", str(tmp_path), "--report", "--tasks", "mnist48", "--seeds", "0", "1"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| cbam / official | 2 | 98.00 ± 1.41 | layer3 0.200 | layer3 0.900 | 0.137 | 2 | 2, 2 | 110 |" in table
    assert "| none / official | 1 | 98.00 ± 0.00 |" in table and "| bam /" not in table
    assert json.loads((tmp_path / "study.json").read_text())["runs"]["mnist48"]["cbam / official"][1]["top1"] == 0.99
    fake_run(study.run_dir(tmp_path, "mnist48", "bam", "macula", 0), 0.91)  # validation at 88 %: never 90
    study.main(["--out", str(tmp_path), "--report", "--tasks", "mnist48", "--seeds", "0", "--runs", "bam:macula"])
    assert "| bam / macula | 1 | 91.00 ± 0.00 | layer3 0.200 | layer3 0.900 | 0.137 | 2 | — | 110 |" in (
        tmp_path / "results.md").read_text()
    assert "cbam / official" in capsys.readouterr().out


def test_only_the_missing_runs_are_trained(tmp_path: Path, monkeypatch) -> None:
    fake_run(study.run_dir(tmp_path, "hard", "none", "official", 0), 0.9)
    trained: list[tuple[str, int]] = []
    monkeypatch.setattr(study, "train", lambda _args, _task, attention, _init, seed, _out: trained.append(
        (attention, seed)))
    args = study.parser().parse_args(["--out", str(tmp_path), "--tasks", "hard", "--seeds", "0", "1", "--jobs", "2"])
    study.train_missing(args, tmp_path, study.plan(args))
    assert sorted(trained) == sorted([("bam", 0), ("cbam", 0), ("none", 1), ("bam", 1), ("cbam", 1)])


def test_a_failed_run_fails_the_study_and_no_further_run_starts(tmp_path: Path, monkeypatch) -> None:
    started: list[str] = []

    def crash(_args, _task, attention: str, *_: object) -> None:
        started.append(attention)
        raise study.subprocess.CalledProcessError(1, "training")
    monkeypatch.setattr(study, "train", crash)
    with pytest.raises(study.subprocess.CalledProcessError):
        study.main(["--out", str(tmp_path), "--tasks", "hard", "--seeds", "0", "1", "2", "--jobs", "1"])
    assert not (tmp_path / "results.md").exists()
    assert started[0] == "none" and len(started) <= 2  # of 9 planned; the worker may take one more as it fails
