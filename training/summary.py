"""What a run says when it starts: its data, preprocessing, device, steps and every parameter group's lr.

Also the warning for ``drop_last`` throwing away a noticeable share of every epoch (a batch size that
does not divide a small training set), with a batch size that would waste less.
"""

from __future__ import annotations

import logging

import torch

from models.checkpoint import Preprocessing

from .config import TrainConfig
from .data import DataBundle
from .distributed import DistInfo
from .stats import class_counts

log = logging.getLogger("training")
DROP_WARN_SHARE = 0.05
MAX_LISTED_CLASSES = 20


def split_counts(name: str, dataset, class_names: list[str]) -> str:
    """``train 180 (a 60, b 60, c 60)``; with many classes the range per class instead."""
    if dataset is None:
        return f"{name} none"
    counts = class_counts(dataset, len(class_names))
    if counts is None:
        return f"{name} {len(dataset)}"
    if len(class_names) <= MAX_LISTED_CLASSES:
        per_class = ", ".join(f"{c} {n}" for c, n in zip(class_names, counts, strict=True))
    else:
        per_class = f"{min(counts)}..{max(counts)} per class"
    return f"{name} {len(dataset)} ({per_class})"


def describe_preprocessing(pre: Preprocessing, options: dict) -> str:
    geometry = f"resize {pre.resize_size}, centre crop" if pre.resize_mode == "center_crop" else "stretch"
    auto = options.get("normalisation")
    measured = f" ({'/'.join(auto['auto'])} measured on {auto['images']} training images)" if auto else ""
    mean, std = (", ".join(f"{v:.4f}" for v in values) for values in (pre.mean, pre.std))
    return f"{pre.color} {pre.input_size[0]}x{pre.input_size[1]} ({geometry}), mean ({mean}) std ({std}){measured}"


def log_start(config: TrainConfig, info: DistInfo, bundle: DataBundle, optimizer: torch.optim.Optimizer,
              steps_per_epoch: int) -> None:
    """The start-up summary, on rank 0."""
    names = bundle.class_names
    shown = ", ".join(names) if len(names) <= MAX_LISTED_CLASSES else f"{', '.join(names[:5])}, ..."
    log.info("data %s: %d classes (%s)", bundle.options.get("dataset", config.dataset), len(names), shown)
    log.info("images: %s", "; ".join(split_counts(split, getattr(bundle, split), names)
                                      for split in ("train", "val", "test")))
    log.info("preprocessing: %s; augment %s", describe_preprocessing(bundle.preprocessing, bundle.options),
             config.augment or "default")
    log.info("device %s x %d process(es); batch %d per process, %d steps per epoch, %d epochs%s", info.device,
             info.world_size, config.batch_size, steps_per_epoch, config.epochs,
             f", patience {config.patience}" if config.patience else "")
    for group in optimizer.param_groups:
        log.info("param group %-17s lr %.4g  weight decay %.4g  (%d tensors)", group.get("name", "?"), group["lr"],
                 group["weight_decay"], len(group["params"]))


def suggest_batch_size(images: int, batch_size: int) -> int | None:
    """The largest batch size in ``[batch_size / 2, batch_size)`` that drops at most 5 % of ``images``."""
    for candidate in range(batch_size - 1, max(1, batch_size // 2) - 1, -1):
        if (images % candidate) / images <= DROP_WARN_SHARE:
            return candidate
    return None


def warn_dropped(images: int, batch_size: int, drop_last: bool) -> int:
    """Warn when ``drop_last`` drops more than 5 % of the ``images`` one process sees per epoch; returns the count."""
    dropped = images % batch_size if drop_last else 0
    if images and dropped / images > DROP_WARN_SHARE:
        better = suggest_batch_size(images, batch_size)
        log.warning("drop_last: each epoch leaves out %d of %d training images per process (%.0f %%, different "
                    "ones every epoch)%s", dropped, images, 100 * dropped / images,
                    f"; --batch-size {better} would leave out {images % better}" if better else "")
    return dropped
