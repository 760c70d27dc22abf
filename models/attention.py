"""BAM and CBAM attention modules that report their own masks.

* BAM: Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module", BMVC 2018 (arXiv:1807.06514).
* CBAM: Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018
  (arXiv:1807.06521).

Every module takes ``forward(x, maps=None)``: when ``maps`` is a dict, the module writes its
:class:`AttentionMap` into it under its ``map_key`` (the qualified name the network gives it), so a
network can return its masks without hooks. Pooling uses ``mean``/``amax`` over the spatial dims, so
any H×W works, non-square included (the authors' BAM code pools with ``kernel_size=H`` and breaks on
non-square maps).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

AttentionKind = Literal["bam", "cbam"]
BamVariant = Literal["paper", "official"]


class AttentionMap(NamedTuple):
    """One module's masks: ``spatial`` (N, 1, h, w) and ``channel`` (N, C), both in [0, 1]."""

    spatial: Tensor
    channel: Tensor


class AttentionModule(nn.Module):
    """Base for modules that can write their mask into a ``maps`` dict under ``map_key``."""

    map_key: str = ""

    def record(self, maps: dict[str, AttentionMap] | None, spatial: Tensor, channel: Tensor) -> None:
        if maps is not None:
            maps[self.map_key] = AttentionMap(spatial, channel)


# --------------------------------------------------------------------------------------------- BAM


class BamChannelGate(nn.Module):
    """``Mc(F) = BN(MLP(AvgPool(F)))`` (BAM eq. 2); one hidden layer of C/r units.

    ``official``: the authors' code puts BN1d + ReLU after the hidden Linear and no BN at the end.
    """

    def __init__(self, channels: int, reduction: int = 16, variant: BamVariant = "paper") -> None:
        super().__init__()
        hidden = channels // reduction
        if variant == "official":
            layers = [nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                      nn.Linear(hidden, channels)]
        else:
            layers = [nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels),
                      nn.BatchNorm1d(channels)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x.mean(dim=(2, 3)))[:, :, None, None]


class BamSpatialGate(nn.Module):
    """``Ms(F) = BN(f1x1(f3x3_d(f3x3_d(f1x1(F)))))`` (BAM eq. 3), C/r channels, dilation d.

    ``official``: BN + ReLU after each of the first three convs and no BN after the last.
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4,
                 variant: BamVariant = "paper") -> None:
        super().__init__()
        hidden = channels // reduction
        official = variant == "official"

        def conv_act(cin: int, k: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, hidden, k, padding=dilation if k == 3 else 0, dilation=dilation if k == 3 else 1)
            return [conv, nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)] if official else [conv, nn.ReLU(inplace=True)]

        layers = conv_act(channels, 1) + conv_act(hidden, 3) + conv_act(hidden, 3) + [nn.Conv2d(hidden, 1, 1)]
        if not official:
            layers.append(nn.BatchNorm2d(1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class BAM(AttentionModule):
    """Bottleneck Attention Module, placed between stages.

    paper:    ``M = σ(Mc + Ms)``, ``F' = F + F ⊗ M`` (eq. 1 and 4).
    official: ``M = σ(Mc ⊗ Ms)``, ``F' = F ⊗ (1 + M)`` (the authors' released code).
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4,
                 variant: BamVariant = "paper") -> None:
        super().__init__()
        if variant not in ("paper", "official"):
            raise ValueError(f"bam_variant must be 'paper' or 'official', got {variant!r}")
        self.variant = variant
        self.channel_gate = BamChannelGate(channels, reduction, variant)
        self.spatial_gate = BamSpatialGate(channels, reduction, dilation, variant)

    def forward(self, x: Tensor, maps: dict[str, AttentionMap] | None = None) -> Tensor:
        mc, ms = self.channel_gate(x), self.spatial_gate(x)
        mask = (mc * ms if self.variant == "official" else mc + ms).sigmoid_()  # fresh tensor: in place is safe
        if maps is not None:  # two full reductions: only when the maps are asked for
            self.record(maps, mask.mean(dim=1, keepdim=True), mask.mean(dim=(2, 3)))
        return torch.addcmul(x, x, mask)  # F + F ⊗ M in one pass over memory


# -------------------------------------------------------------------------------------------- CBAM


class CbamChannelGate(nn.Module):
    """``Mc(F) = σ(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` (CBAM eq. 2), one MLP shared by both pools."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                 nn.Linear(channels // reduction, channels))

    def forward(self, x: Tensor) -> Tensor:
        avg_max = self.mlp(torch.stack((x.mean(dim=(2, 3)), x.amax(dim=(2, 3)))))  # one MLP call for both
        return torch.sigmoid(avg_max[0] + avg_max[1])


class CbamSpatialGate(nn.Module):
    """``Ms(F) = σ(BN(conv7x7([MaxPool_c(F); AvgPool_c(F)])))`` (CBAM eq. 3).

    Conv without bias followed by BN with momentum 0.01, as in the authors' ``BasicConv``.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(AttentionModule):
    """Convolutional Block Attention Module: channel gate, then spatial gate (CBAM eq. 1)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_gate = CbamChannelGate(channels, reduction)
        self.spatial_gate = CbamSpatialGate(kernel_size)

    def forward(self, x: Tensor, maps: dict[str, AttentionMap] | None = None, residual: Tensor | None = None
                ) -> Tensor:
        """``Ms(F') ⊗ F'`` with ``F' = Mc(F) ⊗ F``; plus ``residual`` if given (the block's shortcut).

        The gating passes over memory cost more than their arithmetic, so a residual block hands its
        shortcut in: the last gate and the add become one ``addcmul``, and without autograd ``F'``
        overwrites the block's own temporary ``x`` instead of allocating (only when ``residual`` is given).
        """
        mc = self.channel_gate(x)
        in_place = residual is not None and not torch.is_grad_enabled()
        x = x.mul_(mc[:, :, None, None]) if in_place else x * mc[:, :, None, None]
        ms = self.spatial_gate(x)
        self.record(maps, ms, mc)
        return x * ms if residual is None else torch.addcmul(residual, x, ms)


# ------------------------------------------------------------------------------------------ switch


def make_attention(kind: str | None, channels: int, *, bam_variant: BamVariant = "paper") -> nn.Module | None:
    """The one attention switch: ``None``, ``"bam"`` or ``"cbam"`` for a feature map of ``channels``."""
    if kind is None:
        return None
    if kind == "bam":
        return BAM(channels, variant=bam_variant)
    if kind == "cbam":
        return CBAM(channels)
    raise ValueError(f"attention must be None, 'bam' or 'cbam', got {kind!r}")
