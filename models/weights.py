"""Read a state dict that another project saved, without running any of its pickled code.

Two file kinds: ``*.safetensors`` (read with safetensors) and anything else torch saved (``.pth``,
``.pth.tar``, ``.pt``, zip or the pre-1.6 legacy format), read with ``torch.load(weights_only=True)``,
which only rebuilds tensors, containers and plain numbers and refuses every other pickled object.

Training scripts wrap their state dict in a dict (``{"state_dict": ..., "epoch": ..., "optimizer": ...}``)
and ``nn.DataParallel``/DDP/``torch.compile`` prefix every key (``module.``, ``_orig_mod.``): both are
unwrapped here, and the wrapper's scalar entries (epoch, arch, best accuracy) come back as ``info``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

WRAPPER_KEYS = ("state_dict", "model")  # where training scripts keep the state dict, in the order tried
KEY_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


class WeightsError(ValueError):
    """The file cannot be read as a state dict; the message names the file and the reason."""


@dataclass
class Weights:
    """A state dict and the scalar entries (``epoch``, ``arch``, ...) of the dict that wrapped it."""

    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def read_weights(path: str | os.PathLike) -> Weights:
    """Read ``path`` (safetensors or a weights-only torch file) into :class:`Weights`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    state, info = _unwrap(raw)
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict), possibly under "
                           f"{' or '.join(repr(k) for k in WRAPPER_KEYS)}")
    return Weights(strip_prefixes(state), info)


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        # junk, a truncated file, or a pickle of objects other than tensors (refused, never run)
        raise WeightsError(f"{path}: not a weights-only torch file: torch.load(weights_only=True) reads "
                           f"tensors, containers and numbers only ({exc})") from exc


def _unwrap(raw: Any) -> tuple[dict, dict[str, Any]]:
    info: dict[str, Any] = {}
    for key in WRAPPER_KEYS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            info = {k: scalar for k, v in raw.items() if (scalar := _scalar(v)) is not None}
            return raw[key], info
    return (raw if isinstance(raw, dict) else {}), info


def _scalar(value: Any) -> int | float | str | None:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    return value if isinstance(value, int | float | str) else None


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` / ``_orig_mod.`` prefix that every key carries (repeatedly: DDP around compile)."""
    changed = True
    while changed:
        changed = False
        for prefix in KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state
