"""Inference-time rewrite that keeps the outputs: fold every BatchNorm into the convolution (or linear) before it.

In eval mode BN is a fixed per-channel affine map, so ``BN(conv(x)) = conv'(x)`` with rescaled weights and a
bias (``torch.nn.utils.fusion``). Folding removes one full read and write of each feature map, so the model runs
faster (measured in docs/benchmarks.md), with outputs equal up to float rounding.
The folded model is for inference only: its BNs become ``Identity``, so it no longer trains or saves as a
Macula checkpoint.

    model = fold_batchnorm(model.eval())
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

# (producer, BatchNorm) attribute pairs where the module's forward is ``bn(conv(x))``: the stem and the
# blocks (resnet.py) and CBAM's spatial gate (attention.py).
ATTRIBUTE_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv", "bn"))
FOLDERS = ((nn.Conv2d, nn.BatchNorm2d, fuse_conv_bn_eval), (nn.Linear, nn.BatchNorm1d, fuse_linear_bn_eval))


def _folded(producer: nn.Module, norm: nn.Module) -> nn.Module | None:
    """``producer`` with ``norm`` folded in, or None when the pair is not conv→BN2d or linear→BN1d."""
    for producer_type, norm_type, fuse in FOLDERS:
        if type(producer) is producer_type and type(norm) is norm_type and norm.track_running_stats:
            return fuse(producer, norm)
    return None


def _fold_pair(parent: nn.Module, producer_key: str, norm_key: str) -> int:
    folded = _folded(getattr(parent, producer_key), getattr(parent, norm_key))
    if folded is None:
        return 0
    setattr(parent, producer_key, folded)
    setattr(parent, norm_key, nn.Identity())
    return 1


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold, in place, each BN that directly follows a conv or linear layer; returns ``model``.

    The pairs are the named ones in :data:`ATTRIBUTE_PAIRS` and neighbours in an ``nn.Sequential`` (the
    downsample shortcut, BAM's gates). Refuses a model in training mode, where BN uses batch statistics.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: call model.eval() first")
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                _fold_pair(module, str(i), str(i + 1))
        for producer_key, norm_key in ATTRIBUTE_PAIRS:
            if hasattr(module, producer_key) and hasattr(module, norm_key):
                _fold_pair(module, producer_key, norm_key)
    return model


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
