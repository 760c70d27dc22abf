"""One epoch of training, one pass of evaluation, and the optimiser/schedule that drive them.

The recipe is the papers': SGD with momentum 0.9 and weight decay 1e-4 (He et al. 2016 §3.4; BAM
§4 and CBAM §4 train the same way), a step (×0.1) or cosine schedule (Loshchilov & Hutter, SGDR,
ICLR 2017) with linear warmup (Goyal et al., "Accurate, Large Minibatch SGD", 2017), optional label
smoothing (Szegedy et al., CVPR 2016 §7) and AMP. Under DDP each rank sees its shard; ``evaluate``
sums counts over ranks so every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import ConfigError, TrainConfig

log = logging.getLogger("training")


# ------------------------------------------------------------------------------ optimiser and schedule


def make_optimizer(model: nn.Module, config: TrainConfig, backbone: set[str] | None = None) -> torch.optim.SGD:
    """SGD; parameters named in ``backbone`` (loaded by ``--init-from``) get ``lr × backbone_lr_scale``.

    BatchNorm and bias parameters get no weight decay (Goyal et al. 2017 §5.1, "no bias decay").
    Each group is named ``head`` or ``backbone`` (everything not loaded by ``--init-from`` is "head"),
    with ``.no_decay`` for the biases and norms.
    """
    backbone = backbone or set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name.removeprefix("module.") in backbone, param.ndim <= 1), []).append(param)
    param_groups = [{"params": params, "lr": config.lr * (config.backbone_lr_scale if is_backbone else 1.0),
                     "weight_decay": 0.0 if no_decay else config.weight_decay,
                     "name": ("backbone" if is_backbone else "head") + (".no_decay" if no_decay else "")}
                    for (is_backbone, no_decay), params in sorted(groups.items())]
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of the ``head`` and (with ``--init-from``) the ``backbone`` parameters."""
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:  # state from before groups were named: the first group is the head's
        lrs.setdefault(group.get("name", "head").split(".")[0], group["lr"])
    return lrs


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, milestones: Iterable[float]) -> float:
    """The learning-rate multiplier at optimiser step ``step`` of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 0.1 ** sum(step >= m * total for m in milestones)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """A per-step LambdaLR (its state dict is plain numbers, so ``OUT/last`` stays weights-only)."""
    total, warmup = config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
    milestones = tuple(config.step_milestones)

    def factor(step: int) -> float:
        return lr_factor(step, total=total, warmup=warmup, schedule=config.schedule, milestones=milestones)

    return LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------- precision


def autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """fp16/bf16 autocast on CUDA, bf16 on CPU; a no-op for ``amp="none"``."""
    if config.amp == "none":
        return contextlib.nullcontext()
    if config.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.float16 if config.amp == "fp16" else torch.bfloat16)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -------------------------------------------------------------------------------------------- progress


def progress(batches: Iterable, *, total: int, desc: str, is_main: bool, log_interval: int) -> Iterator:
    """tqdm on rank 0 when stderr is a terminal; otherwise a log line every ``log_interval`` batches."""
    if is_main and sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    for i, batch in enumerate(batches):
        if is_main and log_interval and i % log_interval == 0:
            log.info("%s: batch %d/%d", desc, i, total)
        yield batch


# ------------------------------------------------------------------------------------------------ loops


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                    config: TrainConfig, *, epoch: int, device: torch.device,
                    scaler: torch.amp.GradScaler | None = None, is_main: bool = True) -> dict[str, float]:
    """One pass over ``loader``; returns this rank's ``loss``, ``acc``, ``img_per_s``, ``seconds`` and, at the
    end, ``lr`` (the head's) and ``lrs`` (every role's: ``head``, ``backbone``)."""
    model.train()
    loss_sum = correct = seen = 0.0
    start = time.perf_counter()
    batches = progress(loader, total=len(loader), desc=f"epoch {epoch}", is_main=is_main,
                       log_interval=config.log_interval)
    for images, targets in batches:
        images, targets = to_device(images, device, config.channels_last), targets.to(device, non_blocking=True)
        with autocast(config, device):
            logits = model(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        backward_and_step(loss, optimizer, model, config.clip_grad, scaler)
        scheduler.step()
        loss_sum += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    seconds = time.perf_counter() - start
    lrs = group_lrs(optimizer)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1),
            "lr": lrs.get("head", max(lrs.values())), "lrs": lrs,
            "img_per_s": seen / max(seconds, 1e-9), "seconds": seconds}


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, model: nn.Module,
                      clip_grad: float | None, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def evaluate(model: nn.Module, loader, config: TrainConfig, *, device: torch.device, num_classes: int,
             is_main: bool = True, sync: bool = True, confusion: bool = False) -> dict[str, Any]:
    """Loss, top-1 ``acc``, ``top5`` and ``per_class`` accuracy over ``loader``; with ``confusion``, also the
    confusion matrix (``confusion[true][predicted]`` image counts).

    Under DDP with ``sync`` (each rank holding a shard), the counts are summed over ranks first.
    """
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top1, top5
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)  # true × predicted
    for images, targets, *_ in progress(loader, total=len(loader), desc="eval", is_main=is_main,
                                        log_interval=config.log_interval):
        images, targets = to_device(images, device, config.channels_last), targets.to(device)
        with autocast(config, device):
            logits = model(images).float()
        predicted = logits.argmax(1)
        sums[0] += F.cross_entropy(logits, targets, reduction="sum")
        sums[1] += (predicted == targets).sum()
        sums[2] += (logits.topk(k, 1).indices == targets[:, None]).any(1).sum()
        matrix += torch.bincount(targets * num_classes + predicted, minlength=num_classes * num_classes)
    if sync and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(matrix)
    matrix = matrix.view(num_classes, num_classes)
    counts = matrix.sum(1)
    n = max(counts.sum().item(), 1.0)
    result = {"loss": sums[0].item() / n, "acc": sums[1].item() / n, "top5": sums[2].item() / n,
              "per_class": (matrix.diagonal() / counts.clamp(min=1)).tolist(), "n": int(counts.sum().item())}
    if confusion:
        result["confusion"] = matrix.long().tolist()
    return result
