"""python -m training end to end on tiny runs: outputs, resume, evaluate, errors, --init-from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from models import load_checkpoint
from training.cli import config_from_args, main, parser
from training.distributed import DistInfo
from training.evaluate import main as evaluate_main
from training.evaluate import parser as evaluate_parser
from training.evaluate import run as evaluate_run
from training.trainer import Trainer, load_last

TINY = ["--dataset", "cluttered-mnist", "--canvas-size", "32", "--clutter", "2", "--limit-train", "48",
        "--limit-val", "16", "--batch-size", "16", "--workers", "0", "--lr", "0.05", "--log-interval", "0"]


def train(out: Path, *extra: str) -> None:
    assert main(["--arch", "resnet20", "--attention", "cbam", *TINY, "--out", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    train(out, "--epochs", "2")
    return out


def test_a_run_writes_every_output(straight):
    assert {p.name for p in straight.iterdir()} >= {"model.safetensors", "last", "metrics.json", "curves.png",
                                                    "attention.png"}
    model, meta = load_checkpoint(straight / "model.safetensors")
    assert meta.arch["attention"] == "cbam" and meta.class_names == [str(d) for d in range(10)]
    assert meta.preprocessing.input_size == (32, 32) and meta.preprocessing.color == "L"
    assert meta.training["dataset"] == "cluttered-mnist" and 0.0 <= meta.training["test_acc"] <= 1.0
    assert meta.calibration.temperature > 0  # fitted at the end of training (training.calibration)
    assert meta.calibration.detector.info == {"fit_images": 48, "val_images": 16}
    metrics = json.loads((straight / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert all(row["img_per_s"] > 0 and row["lr"] >= 0 for row in metrics["epochs"])
    assert metrics["best_val_acc"] == pytest.approx(max(r["val_acc"] for r in metrics["epochs"]))
    assert meta.training["val_acc"] == metrics["best_val_acc"] and metrics["test"]["n"] == 16
    # the file holds the best epoch's weights: scoring it again gives the accuracies in its summary
    for split, key in (("val", "val_acc"), ("test", "test_acc")):
        report = evaluate_run(evaluate_parser().parse_args([str(straight / "model.safetensors"), "--split", split,
                                                           "--limit", "16", "--canvas-size", "32"]))
        assert report["top1"] == pytest.approx(meta.training[key]), split


def test_resume_continues_from_the_saved_epoch_with_the_same_optimizer_state(straight, tmp_path):
    # stop a 2-epoch run after epoch 1 (as a kill would), then resume it from OUT/last
    args = ["--arch", "resnet20", "--attention", "cbam", *TINY, "--out", str(tmp_path), "--epochs", "2"]
    config, _ = config_from_args(parser().parse_args(args))
    Trainer(config, DistInfo()).fit(stop_after=1)
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "attention.png").stat().st_size > 0
    saved = load_last(tmp_path)
    assert saved["epoch"] == 1 and saved["config"]["epochs"] == 2 and len(saved["history"]) == 1

    config, state = config_from_args(parser().parse_args(["--resume", str(tmp_path)]))
    assert config.epochs == 2 and config.canvas_size == 32 and config.out == str(tmp_path)
    trainer = Trainer(config, DistInfo(), resume=state)
    restored = trainer.optimizer.state_dict()
    assert trainer.run.epoch == 1 and restored["param_groups"] == saved["optimizer"]["param_groups"]
    assert all(torch.equal(restored["state"][i]["momentum_buffer"], s["momentum_buffer"])
               for i, s in saved["optimizer"]["state"].items())
    assert trainer.scheduler.last_epoch == saved["scheduler"]["last_epoch"] > 0

    assert main(["--resume", str(tmp_path)]) == 0
    resumed, uninterrupted = load_last(tmp_path), load_last(straight)
    assert resumed["epoch"] == 2 and [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == saved["history"][0]
    # same data order, same canvases, same RNG: the resumed run ends on the uninterrupted run's weights
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_bad_dataset_path_is_a_clear_error_and_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training", "--dataset", f"imagefolder:{tmp_path / 'nope'}",
                             "--out", str(tmp_path / "out"), "--epochs", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error:" in result.stderr and "no such dataset folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_arch_is_refused_before_any_data_is_read(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training", "--arch", "resnet19", "--dataset",
                             f"imagefolder:{tmp_path / 'nope'}", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: argument --arch: invalid choice: 'resnet19'" in result.stderr and "resnet20" in result.stderr
    assert "no such dataset folder" not in result.stderr and not (tmp_path / "out").exists()


def test_patience_stops_a_run_that_no_longer_improves(tmp_path):
    # one validation image: accuracy is 0 or 1, so with patience 1 the run stops by epoch 3 of 5
    out = tmp_path / "run"
    assert main(["--arch", "resnet20", "--attention", "none", *TINY, "--limit-val", "1", "--limit-train", "16",
                 "--epochs", "5", "--patience", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    accuracies = [row["val_acc"] for row in metrics["epochs"]]
    best_epoch = accuracies.index(max(accuracies)) + 1
    assert 2 <= len(accuracies) <= 3 and len(accuracies) == best_epoch + 1
    assert metrics["stopped_early"] == {"after_epoch": len(accuracies), "best_epoch": best_epoch, "patience": 1}
    assert "test" in metrics and (out / "curves.png").is_file()  # the run was finished: tested and drawn
    assert load_checkpoint(out / "model.safetensors")[1].training["epoch"] == best_epoch


def test_evaluate_reports_accuracy_and_localisation(straight, capsys):
    assert evaluate_main([str(straight / "model.safetensors"), "--limit", "64", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "cluttered-mnist" and report["split"] == "test" and report["images"] == 64
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0 and len(report["per_class"]) == 10
    assert list(report["localisation"]) == [f"layer{s}.{b}.cbam" for s in (1, 2, 3) for b in range(3)]
    assert all(0.0 <= v <= 1.0 for v in report["localisation"].values()) and 0.05 < report["box_share"] < 0.6
    assert list(report["pointing"]) == list(report["localisation"])
    assert all(0.0 <= v <= 1.0 for v in report["pointing"].values())
    assert evaluate_main([str(straight / "missing.safetensors")]) == 2


def test_init_from_torchvision_on_an_image_folder(tmp_path):
    from tests.unit.test_training_data import write_folder

    root = write_folder(tmp_path / "pets", per_class=4, size=(48, 40))
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    out = tmp_path / "run"
    assert main(["--arch", "resnet18", "--attention", "bam", "--dataset", f"imagefolder:{root}", "--image-size", "32",
                 "--init-from", f"torchvision:{tmp_path / 'resnet18.pth'}", "--backbone-lr-scale", "0",
                 "--mean", "auto", "--std", "auto", "--resize-mode", "stretch", "--augment", "light",
                 "--schedule", "step", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", str(out)]) == 0
    model, meta = load_checkpoint(out / "model.safetensors")
    state = model.state_dict()
    assert meta.class_names == ["cat", "dog"]
    assert meta.training["init_from"].startswith("torchvision:")
    # backbone lr scale 0: the loaded convolutions are exactly the source's; the new head has trained
    assert torch.equal(state["layer3.1.conv2.weight"], source["layer3.1.conv2.weight"])
    assert state["fc.weight"].shape == (2, 512)
    # both learning rates are logged: the new head's, and the loaded backbone's (scaled to 0)
    row = json.loads((out / "metrics.json").read_text())["epochs"][0]
    assert row["lr"] > 0 and row["lr_backbone"] == 0
    # --mean/--std auto: the training images' own statistics, at the size the model sees them, in the checkpoint
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR), np.float64) / 255
                       for p in sorted((root / "train").rglob("*.png"))])
    assert meta.preprocessing.resize_mode == "stretch"
    np.testing.assert_allclose(meta.preprocessing.mean, pixels.mean((0, 1, 2)), atol=2e-3)
    np.testing.assert_allclose(meta.preprocessing.std, pixels.std((0, 1, 2)), atol=2e-3)
