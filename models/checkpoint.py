"""The Macula checkpoint: one ``*.safetensors`` file that rebuilds and serves its model.

The only code ``training/`` and ``service/`` share. Tensors are the model's state dict; the
safetensors ``__metadata__`` (string → string) carries JSON for everything else::

    format            "macula.checkpoint"
    format_version    "1"
    arch              {"name", "attention", "num_classes", "stem", "bam_variant", "in_chans"}
    class_names       ["0", "1", ...]
    preprocessing     {"input_size": [H, W], "resize_mode", "resize_size", "mean", "std", "color"}
    training          free-form summary (dataset, epochs, accuracy, ...)
    calibration       optional: softmax temperature and unfamiliar-input detector (models.familiarity)
    <extra>           any other keyword given to save_checkpoint, JSON-encoded

No pickle is ever read. The model's version is the first 12 hex digits of the file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .familiarity import Calibration
from .registry import create_model, list_models

FORMAT = "macula.checkpoint"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input; the training eval transform and the service share it.

    ``resize_mode="center_crop"``: shorter side to ``resize_size``, then centre crop ``input_size``
    (the ImageNet 256 → 224 rule). ``"stretch"``: resize straight to ``input_size``.
    """

    input_size: tuple[int, int] = (224, 224)
    resize_mode: Literal["center_crop", "stretch"] = "center_crop"
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    color: Literal["RGB", "L"] = "RGB"

    def __post_init__(self) -> None:
        channels = 3 if self.color == "RGB" else 1
        if self.resize_mode not in ("center_crop", "stretch") or self.color not in ("RGB", "L"):
            raise ValueError(f"bad preprocessing: {self}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values for color={self.color}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        for key in ("input_size", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def eval_transform(self):
        """torchvision transforms v2 pipeline: PIL image → normalised float tensor (C, H, W)."""
        from torchvision.transforms import v2

        resize = (v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.input_size)) \
            if self.resize_mode == "center_crop" else (v2.Resize(self.input_size, antialias=True),)
        return v2.Compose([v2.Grayscale() if self.color == "L" else v2.RGB(), v2.PILToTensor(), *resize,
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])


@dataclass
class CheckpointMetadata:
    arch: dict[str, Any]
    class_names: list[str]
    preprocessing: Preprocessing
    version: str
    training: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None  # absent in checkpoints written before it existed

    @property
    def num_classes(self) -> int:
        return int(self.arch["num_classes"])


def file_version(path: str | os.PathLike) -> str:
    """First 12 hex digits of the file's sha256: the model version the service reports."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a kill mid-write leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, class_names: list[str],
                    preprocessing: Preprocessing | None = None, training: dict[str, Any] | None = None,
                    calibration: Calibration | None = None, **extra: Any) -> str:
    """Write ``model`` (built by ``create_model``) to ``path`` atomically; returns the version."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    arch = getattr(model, "config", None)
    if arch is None:
        raise CheckpointError("model has no .config: build it with models.create_model")
    if len(class_names) != arch["num_classes"]:
        raise CheckpointError(f"{len(class_names)} class names for a model with {arch['num_classes']} classes")
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "arch": json.dumps(arch),
        "class_names": json.dumps([str(c) for c in class_names]),
        "preprocessing": json.dumps(asdict(preprocessing or Preprocessing())),
        "training": json.dumps(training or {}),
        **{key: json.dumps(value) for key, value in extra.items()},
    }
    if calibration is not None:
        metadata["calibration"] = json.dumps(calibration.to_json())
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return file_version(path)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def _parse_metadata(path: Path, raw: dict[str, str]) -> CheckpointMetadata:
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a Macula checkpoint (metadata format={raw.get('format')!r})")
    if int(raw.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {raw['format_version']} is newer than this code "
                              f"({FORMAT_VERSION})")
    try:
        known = {"format", "format_version", "arch", "class_names", "preprocessing", "training", "calibration"}
        calibration = json.loads(raw["calibration"]) if "calibration" in raw else None
        meta = CheckpointMetadata(
            arch=json.loads(raw["arch"]), class_names=json.loads(raw["class_names"]),
            preprocessing=Preprocessing.from_dict(json.loads(raw.get("preprocessing", "{}"))),
            version=file_version(path), training=json.loads(raw.get("training", "{}")),
            extra={k: json.loads(v) for k, v in raw.items() if k not in known},
            calibration=Calibration.from_json(calibration) if calibration is not None else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed metadata: {exc}") from exc
    if meta.arch.get("name") not in list_models():
        raise CheckpointError(f"{path}: unknown architecture {meta.arch.get('name')!r}; "
                              f"known: {', '.join(list_models())}")
    if len(meta.class_names) != meta.num_classes:
        raise CheckpointError(f"{path}: metadata lists {len(meta.class_names)} class names but "
                              f"num_classes={meta.num_classes}")
    return meta


def _check_tensors(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}" * bool(missing), f"unexpected {unexpected[:5]}" * bool(unexpected),
                 f"wrong shapes {wrong[:5]}" * bool(wrong)]
        raise CheckpointError(f"{path}: tensors do not match the architecture in its metadata "
                              f"({', '.join(p for p in parts if p)})")


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, CheckpointMetadata]:
    """Rebuild the model from the file's metadata, load it strictly, return ``(model.eval(), metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    raw, tensors = _read(path)
    meta = _parse_metadata(path, raw)
    kwargs = {k: v for k, v in meta.arch.items() if k != "name"}
    model = create_model(meta.arch["name"], **kwargs)
    _check_tensors(path, model, tensors)
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location).eval(), meta
