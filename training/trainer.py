"""A whole training run: data, model, loop, and the files it leaves in ``OUT``.

``OUT/model.safetensors``  best model by validation accuracy (a Macula checkpoint, servable as is)
``OUT/last``               resumable state, ``torch.load(..., weights_only=True)``-loadable
``OUT/metrics.json``       per-epoch loss, accuracy, learning rates and images/s (+ the test score)
``OUT/curves.png``, ``OUT/attention.png``  redrawn every epoch, and from the best model at the end
Only rank 0 writes; every write goes to a temporary file renamed over the old one.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from models import create_model, load_checkpoint, save_checkpoint
from models.checkpoint import atomic_write
from models.familiarity import Calibration

from . import distributed, plots, summary
from .calibration import calibrate
from .config import TrainConfig
from .data import DataBundle, build_datasets
from .engine import evaluate, make_optimizer, make_scheduler, train_one_epoch
from .pretrained import load_torchvision_backbone

log = logging.getLogger("training")
CHECKPOINT, LAST, METRICS = "model.safetensors", "last", "metrics.json"


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    best_acc: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: TrainConfig, bundle: DataBundle) -> tuple[nn.Module, set[str]]:
    """The network for this data; with ``--init-from``, the names of the tensors loaded into it."""
    model = create_model(config.arch, attention=config.attention, num_classes=len(bundle.class_names),
                         bam_variant=config.bam_variant, in_chans=bundle.in_chans, init=config.init,
                         zero_init_residual=config.zero_init_residual)
    backbone = load_torchvision_backbone(model, config.init_from) if config.init_from else set()
    return model, backbone


def make_loaders(bundle: DataBundle, config: TrainConfig, info: distributed.DistInfo):
    """Train loader with a (Distributed)Sampler re-shuffled per epoch; val sharded ``rank::world`` exactly."""
    sampler = DistributedSampler(bundle.train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=config.seed)
    common = {"batch_size": config.batch_size, "num_workers": config.workers,
              "pin_memory": info.device.type == "cuda", "persistent_workers": False}
    drop_last = len(sampler) >= config.batch_size
    train = DataLoader(bundle.train, sampler=sampler, drop_last=drop_last, **common)
    if info.is_main:
        summary.warn_dropped(len(sampler), config.batch_size, drop_last)
    val_shard = Subset(bundle.val, range(info.rank, len(bundle.val), info.world_size))
    return train, DataLoader(val_shard, shuffle=False, **common), sampler


def set_data_epoch(dataset, epoch: int) -> None:
    """Tell a re-drawn dataset (cluttered-mnist) which epoch it is, through any Subset wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def epochs_since_best(history: list[dict[str, Any]]) -> int:
    """Epochs run after the first one that reached the best validation accuracy (``--patience`` counts these)."""
    if not history:
        return 0
    best = max(row["val_acc"] for row in history)
    return history[-1]["epoch"] - next(row["epoch"] for row in history if row["val_acc"] == best)


# ------------------------------------------------------------------------------------ resumable state


def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [version, list(mt), gauss], "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                            has_gauss, cached]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_last(path: Path, model: nn.Module, optimizer, scheduler, scaler, run: RunState,
              config: TrainConfig) -> None:
    state = {"model": getattr(model, "module", model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "epoch": run.epoch, "best_acc": run.best_acc, "history": run.history, "rng": rng_state(),
             "config": config.to_dict()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_last(out: str | Path) -> dict[str, Any]:
    path = Path(out) / LAST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resumable state (was {out} written by python -m training?)")
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------ run


class Trainer:
    """Everything one run needs, built from a config (and, to resume, the saved state)."""

    def __init__(self, config: TrainConfig, info: distributed.DistInfo, resume: dict[str, Any] | None = None):
        config.validate()
        self.config, self.info, self.out = config, info, Path(config.out)
        seed_everything(config.seed)
        self.bundle = build_datasets(config)
        model, backbone = build_model(config, self.bundle)
        model = model.to(info.device)
        model = model.to(memory_format=torch.channels_last) if config.channels_last else model
        self.model = model if not info.distributed else DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.train_loader, self.val_loader, self.sampler = make_loaders(self.bundle, config, info)
        self.optimizer = make_optimizer(self.model, config, backbone)
        self.scheduler = make_scheduler(self.optimizer, config, len(self.train_loader))
        fp16 = config.amp == "fp16" and info.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.run = RunState()
        if resume is not None:
            self._restore(resume)
        if info.is_main:
            summary.log_start(config, info, self.bundle, self.optimizer, len(self.train_loader))

    def _restore(self, state: dict[str, Any]) -> None:
        getattr(self.model, "module", self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.run = RunState(state["epoch"], state["best_acc"], list(state["history"]))
        set_rng_state(state["rng"])
        log.info("resumed %s after epoch %d (best val acc %.4f)", self.out, self.run.epoch, self.run.best_acc)

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train the remaining epochs (or up to ``stop_after``, resumable later); returns ``metrics.json``'s dict."""
        last = min(self.config.epochs, stop_after or self.config.epochs)
        for epoch in range(self.run.epoch + 1, last + 1):
            if self.patience_spent():
                log.info("early stop: no better validation accuracy for %d epochs", self.config.patience)
                break
            self.sampler.set_epoch(epoch)
            set_data_epoch(self.bundle.train, epoch)
            train = train_one_epoch(self.model, self.train_loader, self.optimizer, self.scheduler, self.config,
                                    epoch=epoch, device=self.info.device, scaler=self.scaler,
                                    is_main=self.info.is_main)
            val = evaluate(self.model, self.val_loader, self.config, device=self.info.device,
                           num_classes=len(self.bundle.class_names), is_main=self.info.is_main)
            self._end_epoch(epoch, train, val)
        distributed.barrier(self.info)
        done = last == self.config.epochs or self.patience_spent()
        return self._finish() if self.info.is_main and done else {}

    def patience_spent(self) -> bool:
        """``--patience`` epochs have passed without a better validation accuracy."""
        return self.config.patience is not None and epochs_since_best(self.run.history) >= self.config.patience

    def _end_epoch(self, epoch: int, train: dict[str, float], val: dict[str, Any]) -> None:
        row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], "val_loss": val["loss"],
               "val_acc": val["acc"], "val_top5": val["top5"], "lr": train["lr"],
               **({"lr_backbone": train["lrs"]["backbone"]} if "backbone" in train.get("lrs", {}) else {}),
               "img_per_s": train["img_per_s"] * self.info.world_size, "epoch_seconds": train["seconds"]}
        self.run.history.append(row)
        self.run.epoch = epoch
        improved = val["acc"] > self.run.best_acc
        self.run.best_acc = max(self.run.best_acc, val["acc"])
        backbone_lr = f" backbone {row['lr_backbone']:.4g}" if "lr_backbone" in row else ""
        log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr head %.4g%s | %.0f img/s%s",
                 epoch, self.config.epochs, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
                 row["lr"], backbone_lr, row["img_per_s"], "  (best)" if improved else "")
        if not self.info.is_main:
            return
        if improved:
            self.save_model(self.summary(epoch, val))
        save_last(self.out / LAST, self.model, self.optimizer, self.scheduler, self.scaler, self.run, self.config)
        self.write_metrics()
        self.draw(getattr(self.model, "module", self.model))

    def draw(self, model: nn.Module) -> None:
        """``curves.png`` and ``attention.png`` (``model``'s masks on validation images), rank 0 only."""
        plots.curves(self.run.history, self.out / "curves.png")
        plots.attention_grid(model, self.bundle.val, self.bundle.preprocessing, self.out / "attention.png",
                             device=self.info.device, class_names=self.bundle.class_names)

    def summary(self, epoch: int, val: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        return {**self.bundle.options, "epoch": epoch, "epochs": c.epochs, "val_acc": val["acc"],
                "val_top5": val["top5"], "seed": c.seed, "lr": c.lr, "batch_size": c.batch_size,
                "world_size": self.info.world_size, "amp": c.amp, "schedule": c.schedule,
                "init_from": c.init_from, "label_smoothing": c.label_smoothing}

    def save_model(self, summary: dict[str, Any]) -> str:
        return save_checkpoint(self.model, self.out / CHECKPOINT, class_names=self.bundle.class_names,
                               preprocessing=self.bundle.preprocessing, training=summary)

    def write_metrics(self, test: dict[str, Any] | None = None) -> dict[str, Any]:
        metrics = {"config": self.config.to_dict(), "epochs": self.run.history, "best_val_acc": self.run.best_acc}
        if test is not None:
            metrics["test"] = test
        if self.patience_spent():
            metrics["stopped_early"] = {"after_epoch": self.run.epoch, "patience": self.config.patience,
                                        "best_epoch": self.run.epoch - epochs_since_best(self.run.history)}
        text = json.dumps(metrics, indent=2)
        atomic_write(self.out / METRICS, lambda tmp: Path(tmp).write_text(text))
        return metrics

    def fit_calibration(self, best: nn.Module) -> Calibration | None:
        """Temperature and unfamiliar-input detector for the saved model (``training.calibration``)."""
        if not self.config.calibrate:
            return None
        calibration = calibrate(best, self.bundle.train, self.bundle.val, num_classes=len(self.bundle.class_names),
                                transform=self.bundle.preprocessing.eval_transform(), device=self.info.device)
        log.info("calibration: temperature %.3f, %s detector (threshold %.4g accepts %.0f%% of validation images)",
                 calibration.temperature, calibration.detector.method, calibration.detector.threshold,
                 100 * calibration.detector.accept_rate)
        return calibration

    def _finish(self) -> dict[str, Any]:
        """Score the best model on the test split (if the dataset has one), then draw the figures."""
        best, meta = load_checkpoint(self.out / CHECKPOINT, map_location=self.info.device)
        test = None
        if self.bundle.test is not None:
            loader = DataLoader(self.bundle.test, batch_size=self.config.batch_size, num_workers=self.config.workers)
            result = evaluate(best, loader, self.config, device=self.info.device,
                              num_classes=len(self.bundle.class_names), sync=False)
            test = {k: result[k] for k in ("acc", "top5", "loss", "n")}
            log.info("test acc %.4f (top-5 %.4f) on %d images", test["acc"], test["top5"], test["n"])
        calibration = self.fit_calibration(best)
        if test is not None or calibration is not None:
            extra = {"test_acc": test["acc"], "test_top5": test["top5"]} if test is not None else {}
            save_checkpoint(best, self.out / CHECKPOINT, class_names=meta.class_names,
                            preprocessing=meta.preprocessing, training={**meta.training, **extra},
                            calibration=calibration)
        metrics = self.write_metrics(test)
        self.draw(best)
        return metrics
