"""How a new network's weights start: Macula's own rule, or the one the BAM/CBAM authors released.

``"macula"`` (what every Macula model used before the choice existed, kept for reproducing earlier runs):
every ``Conv2d`` (attention convs and the downsample shortcut included) He-normal with fan-out, every
BatchNorm weight 1 and bias 0, every ``Linear`` (``fc`` and the attention MLPs) at PyTorch's default.

``"official"`` (the authors' released training code, Jongchan/attention-module, ``MODELS/model_resnet.py``):

* convs He-normal with fan-out, except the downsample shortcut's 1×1 conv, left at PyTorch's default
  (their rule matches ``"conv"`` in the state-dict key, and ``downsample.0.weight`` does not contain it);
* ``fc`` He-normal with fan-in;
* every BatchNorm weight 1, except **CBAM's spatial-gate BatchNorm, weight 0**: its output is then the
  constant bias 0, so every spatial gate starts at exactly σ(0) = 0.5 and only learns to select once
  gradients move that weight;
* **every bias 0** (``fc``, the attention MLPs, BAM's spatial-gate convs, BatchNorm);
* the attention MLPs' ``Linear`` weights at PyTorch's default.

The authors match on key names of their own modules; here the same rule is applied by module type to
Macula's modules (``CbamSpatialGate.bn`` is their ``SpatialGate.spatial.bn``). BAM's BatchNorms keep weight
1 in both BAM variants, as in their code.

``zero_init_residual`` (torchvision's option; Goyal et al., "Accurate, Large Minibatch SGD", 2017, §5.1):
the last BatchNorm of each residual branch starts at weight 0, so each block starts as its shortcut. It
applies after either rule.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from .attention import CbamSpatialGate

Init = Literal["macula", "official"]
INITS: tuple[str, ...] = ("macula", "official")


def init_macula(model: nn.Module) -> None:
    """He fan-out for every conv, BatchNorm (1, 0); ``Linear`` layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_official(model: nn.Module) -> None:
    """The BAM/CBAM authors' rule (see the module docstring)."""
    shortcut_convs = {id(m) for name, m in model.named_modules() if ".downsample." in f".{name}."
                      and isinstance(m, nn.Conv2d)}
    spatial_gate_bns = {id(m.bn) for m in model.modules() if isinstance(m, CbamSpatialGate)}
    fc = getattr(model, "fc", None)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in shortcut_convs:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.constant_(m.weight, 0.0 if id(m) in spatial_gate_bns else 1.0)
        elif m is fc:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        bias = getattr(m, "bias", None)
        if isinstance(bias, nn.Parameter):
            nn.init.zeros_(bias)


def zero_last_bn_of_each_block(model: nn.Module) -> None:
    """torchvision's ``zero_init_residual``: ``bn2`` (basic) / ``bn3`` (bottleneck) weight 0."""
    from .resnet import BasicBlock, Bottleneck  # resnet.py imports this module


    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def initialise(model: nn.Module, init: str = "macula", *, zero_init_residual: bool = False) -> None:
    """Set ``model``'s starting weights by rule ``init`` (``"macula"`` or ``"official"``)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    (init_official if init == "official" else init_macula)(model)
    if zero_init_residual:
        zero_last_bn_of_each_block(model)
