"""``--init-from torchvision:PATH``: start the backbone from a torchvision ResNet state dict.

Macula's ResNets keep torchvision's state-dict keys for every non-attention weight, so a file saved
with ``torch.save(torchvision.models.resnet50(weights=...).state_dict(), PATH)`` loads straight in.
Attention modules keep their own initialisation; tensors whose shape differs (``fc`` for another
number of classes, ``conv1`` for grayscale input) are skipped and reported. The file is read with
``torch.load(weights_only=True)``: no pickle code runs.
"""

from __future__ import annotations

import logging
import pickle

import torch
from torch import nn

log = logging.getLogger("training")


class InitFromError(ValueError):
    """The ``--init-from`` source cannot be used; the message says why."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InitFromError(f"--init-from: {path}: no such file") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise InitFromError(f"--init-from: {path}: not a weights-only torch state dict ({exc})") from exc
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitFromError(f"--init-from: {path}: expected a dict of tensors (a state dict)")
    return state


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
