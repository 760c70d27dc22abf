"""ResNets with optional BAM or CBAM, laid out like torchvision's ``models/resnet.py``.

Every non-attention weight keeps torchvision's state-dict key (``conv1``, ``bn1``, ``layerK.i.*``,
``fc``), so a torchvision ResNet state dict loads into the backbone. CBAM sits inside each residual
block as ``layerK.i.cbam`` (after the last BN, before the add, CBAM §3.2 / Fig. 3); BAM sits between
stages as ``bam1``, ``bam2``, ... (at every bottleneck but the last, BAM §3.2 / Fig. 1).

* ImageNet ResNets: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
* CIFAR ResNets (20/32/44/56/110): the 3-stage 16/32/64 networks of the same paper, §4.2, with its
  parameter-free "option A" shortcut (subsample, zero-pad the new channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionMap, AttentionModule, BamVariant, make_attention
from .initialisation import Init, initialise

Stem = Literal["imagenet", "cifar"]
Maps = dict[str, AttentionMap] | None

# -------------------------------------------------------------------------------------------- helpers


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut (He et al. 2016, §4.2): stride-2 subsampling, new channels zero-padded."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        # x[:, :, ::2, ::2], written as a 1×1 max-pool so that its output size is the same expression as the
        # stride-2 conv's ((n - 1) // 2 + 1): torch.export can then prove the residual shapes match.
        subsampled = F.max_pool2d(x, kernel_size=1, stride=2)
        return F.pad(subsampled, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def add_residual(out: Tensor, identity: Tensor, cbam: nn.Module | None, maps: Maps) -> Tensor:
    """``CBAM(out) + identity`` (CBAM Fig. 3: attention after the last BN, before the add), or ``out + identity``.

    CBAM fuses its last gate with the add (see :meth:`CBAM.forward`).
    """
    return out + identity if cbam is None else cbam(out, maps, residual=identity)


# --------------------------------------------------------------------------------------------- blocks


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 attention: str | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.cbam = make_attention(attention, planes)

    def forward(self, x: Tensor, maps: Maps = None) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(add_residual(out, x if self.downsample is None else self.downsample(x), self.cbam, maps))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 attention: str | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv1x1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)  # stride here (v1.5)
        self.conv3, self.bn3 = conv1x1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.cbam = make_attention(attention, planes * 4)

    def forward(self, x: Tensor, maps: Maps = None) -> Tensor:
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        return self.relu(add_residual(out, x if self.downsample is None else self.downsample(x), self.cbam, maps))


Block = type[BasicBlock] | type[Bottleneck]

# -------------------------------------------------------------------------------------------- network


class ResNet(nn.Module):
    """A ResNet of ``len(layers)`` stages; ``attention`` is ``None``, ``"bam"`` or ``"cbam"``.

    ``init`` picks the starting weights (``"macula"`` or the authors' ``"official"`` rule) and
    ``zero_init_residual`` starts every block as its shortcut: see :mod:`models.initialisation`.
    """

    def __init__(self, block: Block, layers: Sequence[int], *, widths: Sequence[int] = (64, 128, 256, 512),
                 num_classes: int = 1000, stem: Stem = "imagenet", attention: str | None = None,
                 bam_variant: BamVariant = "paper", in_chans: int = 3, shortcut: str = "conv",
                 init: Init = "macula", zero_init_residual: bool = False) -> None:
        super().__init__()
        if attention not in (None, "bam", "cbam"):
            raise ValueError(f"attention must be None, 'bam' or 'cbam', got {attention!r}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.cin = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, self.cin, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1, self.maxpool = conv3x3(in_chans, self.cin), nn.Identity()
        self.bn1, self.relu = nn.BatchNorm2d(self.cin), nn.ReLU(inplace=True)
        self.num_stages = len(layers)
        block_attention = "cbam" if attention == "cbam" else None
        for i, (width, depth) in enumerate(zip(widths, layers, strict=True)):
            stage = self._make_stage(block, width, depth, 1 if i == 0 else 2, block_attention, shortcut)
            self.add_module(f"layer{i + 1}", stage)
            if attention == "bam" and i < self.num_stages - 1:
                self.add_module(f"bam{i + 1}", make_attention("bam", self.cin, bam_variant=bam_variant))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.cin, num_classes)
        initialise(self, init, zero_init_residual=zero_init_residual)
        for name, module in self.named_modules():
            if isinstance(module, AttentionModule):
                module.map_key = name

    def _make_stage(self, block: Block, planes: int, depth: int, stride: int, attention: str | None,
                    shortcut: str) -> nn.Sequential:
        downsample = None
        cout = planes * block.expansion
        if stride != 1 or self.cin != cout:
            if shortcut == "pad":
                downsample = PadShortcut(cout - self.cin)
            else:
                downsample = nn.Sequential(conv1x1(self.cin, cout, stride), nn.BatchNorm2d(cout))
        blocks = [block(self.cin, planes, stride, downsample, attention)]
        self.cin = cout
        blocks += [block(cout, planes, attention=attention) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def _features(self, x: Tensor, maps: Maps) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            for block in getattr(self, f"layer{i}"):
                x = block(x, maps)
            bam = getattr(self, f"bam{i}", None)
            x = x if bam is None else bam(x, maps)
        return torch.flatten(self.avgpool(x), 1)

    def _forward(self, x: Tensor, maps: Maps) -> Tensor:
        return self.fc(self._features(x, maps))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, None)

    def forward_features(self, x: Tensor, maps: dict[str, AttentionMap] | None = None) -> Tensor:
        """The pooled penultimate features ``(N, C)``: ``model(x) == model.fc(model.forward_features(x))``.

        With a ``maps`` dict, every attention module's masks are written into it (as ``forward_with_attention``).
        """
        return self._features(x, maps)

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, dict[str, AttentionMap]]:
        """Logits (identical to ``forward``) and every module's masks, in network order."""
        maps: dict[str, AttentionMap] = {}
        return self._forward(x, maps), maps


# ------------------------------------------------------------------------------------------- builders

IMAGENET_DEPTHS: dict[str, tuple[Block, tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
CIFAR_DEPTHS: dict[str, int] = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


def build_resnet(name: str, *, stem: Stem | None = None, **kwargs) -> ResNet:
    """Build a named ResNet. 4-stage names default to the ImageNet stem, CIFAR names to theirs."""
    if name in IMAGENET_DEPTHS:
        block, layers = IMAGENET_DEPTHS[name]
        return ResNet(block, layers, stem=stem or "imagenet", **kwargs)
    if name in CIFAR_DEPTHS:
        if stem not in (None, "cifar"):
            raise ValueError(f"{name} is a CIFAR ResNet and only has the 'cifar' stem, got stem={stem!r}")
        n = CIFAR_DEPTHS[name]
        return ResNet(BasicBlock, (n, n, n), widths=(16, 32, 64), stem="cifar", shortcut="pad", **kwargs)
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_architectures())}")


def list_architectures() -> list[str]:
    return [*IMAGENET_DEPTHS, *CIFAR_DEPTHS]
