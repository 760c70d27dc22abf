"""``--init-from torchvision:PATH``: start the backbone from a torchvision ResNet state dict.

Macula's ResNets keep torchvision's state-dict keys for every non-attention weight, so a file saved
with ``torch.save(torchvision.models.resnet50(weights=...).state_dict(), PATH)`` loads straight in.
Attention modules keep their own initialisation; tensors whose shape differs (``fc`` for another
number of classes, ``conv1`` for grayscale input) are skipped and reported. The file is read by
:func:`models.weights.read_weights` (safetensors, or ``torch.load(weights_only=True)``): no pickle code runs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from models.weights import WeightsError, read_weights

log = logging.getLogger("training")


class InitFromError(ValueError):
    """The ``--init-from`` source cannot be used; the message says why."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        return read_weights(path).state_dict
    except WeightsError as exc:
        raise InitFromError(f"--init-from: {exc}") from exc


def load_torchvision_backbone(model: nn.Module, spec: str) -> set[str]:
    """Copy every tensor of ``spec``'s state dict that fits ``model``; returns the names copied."""
    kind, _, path = spec.partition(":")
    if kind != "torchvision" or not path:
        raise InitFromError(f"--init-from expects torchvision:PATH, got {spec!r}")
    source, own = read_state_dict(path), model.state_dict()
    fits = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not any(not k.endswith("num_batches_tracked") for k in fits):
        raise InitFromError(f"--init-from: {path}: no tensor matches {model.config['name']} "
                            f"(is it a torchvision ResNet of the same depth?)")
    skipped = sorted(set(source) - set(fits))
    own.update(fits)
    model.load_state_dict(own)
    fresh = sorted(k for k in own if k not in fits and not k.endswith("num_batches_tracked"))
    log.info("init-from %s: loaded %d tensors; skipped %s; left at init: %d tensors (%s...)", path, len(fits),
             skipped or "none", len(fresh), ", ".join(fresh[:3]))
    return set(fits)
