"""``TrainConfig``: every knob of a training run, as one plain dataclass.

The CLI fills it from flags; ``OUT/last`` stores it as a plain dict (``asdict``) so a resumed run
rebuilds exactly the same setup without pickling an ``argparse.Namespace``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from models import list_models

Amp = Literal["none", "fp16", "bf16"]
Schedule = Literal["cosine", "step"]
Normalisation = tuple[float, ...] | Literal["auto"] | None  # None: the dataset's own default
RESIZE_MODES = ("center_crop", "stretch")
AUGMENTS = ("none", "light", "standard", "strong")


class ConfigError(ValueError):
    """An impossible combination of options; the message names the flag."""


@dataclass
class TrainConfig:
    # what to train
    arch: str = "resnet20"
    attention: str | None = "cbam"
    bam_variant: str = "paper"
    init: str = "macula"  # starting weights: "macula" or the BAM/CBAM authors' "official" (models.initialisation)
    zero_init_residual: bool = False
    dataset: str = "cluttered-mnist"
    out: str = "runs/train"
    # optimisation: the papers' SGD recipe (He et al. 2016; BAM/CBAM §4)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Schedule = "cosine"
    warmup_epochs: float = 0.0
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: x0.1 at these fractions of training
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    # speed
    amp: Amp = "none"
    channels_last: bool = False
    workers: int = 2
    device: str | None = None  # None: cuda when available, else cpu
    # reproducibility and starting point
    seed: int = 0
    init_from: str | None = None  # "torchvision:PATH"
    backbone_lr_scale: float = 1.0
    # data
    download: bool = False
    limit_train: int | None = None
    limit_val: int | None = None
    image_size: int = 224  # imagefolder input size (crop); the other datasets have a fixed size
    canvas_size: int = 64  # cluttered-mnist
    clutter: int = 6  # cluttered-mnist: fragments per canvas
    mean: Normalisation = None  # per-channel, or "auto": computed on the training split
    std: Normalisation = None
    resize_mode: str | None = None  # imagefolder: center_crop (default) or stretch
    augment: str | None = None  # none / light / standard / strong; None: the dataset's default
    # stopping and outputs
    patience: int | None = None  # stop after this many epochs without a better validation accuracy
    log_interval: int = 50
    calibrate: bool = True  # fit a temperature and an unfamiliar-input detector at the end (training.calibration)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        for key in ("mean", "std"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("step_milestones", "mean", "std"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    def validate(self) -> None:
        """Refuse what is wrong before any data is read; dataset-specific checks come with the data."""
        if self.arch not in list_models():
            raise ConfigError(f"--arch: unknown network {self.arch!r}; choose from {', '.join(list_models())}")
        if self.amp not in ("none", "fp16", "bf16"):
            raise ConfigError(f"--amp must be none, fp16 or bf16, got {self.amp!r}")
        if self.schedule not in ("cosine", "step"):
            raise ConfigError(f"--schedule must be cosine or step, got {self.schedule!r}")
        if self.init not in ("macula", "official"):
            raise ConfigError(f"--init must be macula or official, got {self.init!r}")
        if self.attention not in (None, "bam", "cbam"):
            raise ConfigError(f"--attention must be none, bam or cbam, got {self.attention!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0 or self.backbone_lr_scale < 0:
            raise ConfigError("--lr must be > 0 and --backbone-lr-scale >= 0")
        if self.patience is not None and self.patience < 1:
            raise ConfigError("--patience must be >= 1 (epochs without a better validation accuracy)")
        if self.resize_mode not in (None, *RESIZE_MODES):
            raise ConfigError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.augment not in (None, *AUGMENTS):
            raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not (value is None or value == "auto" or (isinstance(value, tuple) and value)):
                raise ConfigError(f"--{name} must be 'auto' or comma-separated numbers, got {value!r}")
        if isinstance(self.std, tuple) and min(self.std) <= 0:
            raise ConfigError("--std values must be > 0")
