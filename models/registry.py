"""``create_model`` / ``list_models``: the public way to build a network by name."""

from __future__ import annotations

from typing import Any

from .attention import BamVariant
from .initialisation import Init
from .resnet import ResNet, Stem, build_resnet, list_architectures


def create_model(name: str, *, attention: str | None = None, num_classes: int = 1000, stem: Stem | None = None,
                 bam_variant: BamVariant = "paper", in_chans: int = 3, init: Init = "macula",
                 zero_init_residual: bool = False) -> ResNet:
    """Build ``name`` (see :func:`list_models`) with ``attention`` ``None``, ``"bam"`` or ``"cbam"``.

    ``stem`` defaults to ``"imagenet"`` for resnet18…152 and is always ``"cifar"`` for resnet20…110.
    ``init`` (``"macula"``, the default, or the BAM/CBAM authors' ``"official"`` rule) and
    ``zero_init_residual`` only set the starting weights (:mod:`models.initialisation`); a loaded
    checkpoint overwrites them. The returned model carries ``model.config``: the keyword arguments
    that rebuild it.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = build_resnet(name, stem=stem, attention=attention, num_classes=num_classes, bam_variant=bam_variant,
                         in_chans=in_chans, init=init, zero_init_residual=zero_init_residual)
    model.config = model_config(name, attention=attention, num_classes=num_classes,
                                stem=stem or ("imagenet" if model.num_stages == 4 else "cifar"),
                                bam_variant=bam_variant, in_chans=in_chans, init=init,
                                zero_init_residual=zero_init_residual)
    return model


def model_config(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"name": name, **kwargs}


def list_models() -> list[str]:
    """Every architecture name ``create_model`` accepts."""
    return list_architectures()
