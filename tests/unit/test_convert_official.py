"""``--from official``: the BAM/CBAM authors' ImageNet checkpoints convert to the same forward.

The reference below is written from the papers' equations (CBAM eq. 2-3, BAM eq. 2-3 in the authors'
released form ``F ⊗ (1 + σ(Mc ⊗ Ms))``), with the module names and order of the authors' code so that
its state dict has their keys. Two of their choices only hold on square inputs, and the reference keeps
them (``faithful=True``): BAM's channel branch average-pools with an ``H×H`` window, and the ImageNet
head is a fixed ``AvgPool2d(7)``. On a non-square input both see only the left part of the map, so the
comparisons on non-square inputs switch them to global pooling, which is what Macula does.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import load_checkpoint
from models.convert import main

# ------------------------------------------------------------------------------ the authors' layout


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class ConvBn(nn.Module):
    """Conv (no bias) + BN with momentum 0.01: keys ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class CbamChannel(nn.Module):
    """``Mc = σ(MLP(AvgPool(F)) + MLP(MaxPool(F)))``, the MLP behind a Flatten (keys ``mlp.1``, ``mlp.3``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Flatten(), nn.Linear(channels, channels // 16), nn.ReLU(),
                                 nn.Linear(channels // 16, channels))

    def forward(self, x: Tensor) -> Tensor:
        window = x.shape[2:]  # the whole map, H×W
        return torch.sigmoid(self.mlp(F.avg_pool2d(x, window)) + self.mlp(F.max_pool2d(x, window)))


class CbamSpatial(nn.Module):
    """``Ms = σ(BN(conv7×7([max_c F; mean_c F])))`` (key ``spatial.{conv,bn}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial = ConvBn(2, 1, 7)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.spatial(torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), 1)))


class RefCBAM(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ChannelGate, self.SpatialGate = CbamChannel(channels), CbamSpatial()

    def forward(self, x: Tensor) -> Tensor:
        self.channel = self.ChannelGate(x)
        x = x * self.channel[:, :, None, None]
        self.spatial = self.SpatialGate(x)
        return x * self.spatial


class BamChannel(nn.Module):
    """``Mc = FC(ReLU(BN(FC(AvgPool(F)))))``; the authors pool with an H×H window (``faithful``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels // 16
        self.gate_c = nn.Sequential(OrderedDict([
            ("flatten", Flatten()), ("gate_c_fc_0", nn.Linear(channels, hidden)),
            ("gate_c_bn_1", nn.BatchNorm1d(hidden)), ("gate_c_relu_1", nn.ReLU()),
            ("gate_c_fc_final", nn.Linear(hidden, channels))]))
        self.faithful = True

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[2]
        pooled = F.avg_pool2d(x, h, stride=h) if self.faithful else x.mean((2, 3), keepdim=True)
        return self.gate_c(pooled)[:, :, None, None]


class BamSpatial(nn.Module):
    """``Ms = conv1×1(ReLU(BN(conv3×3_d4(ReLU(BN(conv3×3_d4(ReLU(BN(conv1×1(F))))))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels // 16
        layers = [("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, 1)),
                  ("gate_s_bn_reduce0", nn.BatchNorm2d(hidden)), ("gate_s_relu_reduce0", nn.ReLU())]
        for i in range(2):
            layers += [(f"gate_s_conv_di_{i}", nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4)),
                       (f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden)), (f"gate_s_relu_di_{i}", nn.ReLU())]
        layers.append(("gate_s_conv_final", nn.Conv2d(hidden, 1, 1)))
        self.gate_s = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.gate_s(x)


class RefBAM(nn.Module):
    """``F' = F ⊗ (1 + σ(Mc ⊗ Ms))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel_att, self.spatial_att = BamChannel(channels), BamSpatial(channels)

    def forward(self, x: Tensor) -> Tensor:
        self.mask = torch.sigmoid(self.channel_att(x) * self.spatial_att(x))
        return x * (1 + self.mask)


class RefBlock(nn.Module):
    """BasicBlock (``expansion=1``) or Bottleneck (4); CBAM after the last BN, before the residual add."""

    def __init__(self, cin: int, planes: int, stride: int, expansion: int, cbam: bool) -> None:
        super().__init__()
        cout = planes * expansion
        if expansion == 1:
            convs = [(cin, planes, 3, stride), (planes, planes, 3, 1)]
        else:
            convs = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, cout, 1, 1)]
        for i, (a, b, k, s) in enumerate(convs, 1):
            self.add_module(f"conv{i}", nn.Conv2d(a, b, k, stride=s, padding=k // 2, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(b))
        self.depth = len(convs)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.cbam = RefCBAM(cout) if cbam else None

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i in range(1, self.depth + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            out = out if i == self.depth else F.relu(out)
        residual = x if self.downsample is None else self.downsample(x)
        out = out if self.cbam is None else self.cbam(out)
        return F.relu(out + residual)


class RefResNet(nn.Module):
    """The authors' ImageNet ResNet: BAM after layer1..3 (``att_type="BAM"``) or CBAM in every block."""

    def __init__(self, depth: int, att_type: str) -> None:
        super().__init__()
        expansion, layers = {18: (1, (2, 2, 2, 2)), 50: (4, (3, 4, 6, 3))}[depth]
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), 1):
            blocks = [RefBlock(cin if j == 0 else planes * expansion, planes, 2 if j == 0 and i > 1 else 1, expansion,
                               att_type == "CBAM") for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = planes * expansion
            if att_type == "BAM" and i < 4:
                self.add_module(f"bam{i}", RefBAM(cin))
        self.avgpool = nn.AvgPool2d(7)
        self.fc = nn.Linear(cin, 1000)
        self.faithful = True

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            x = getattr(self, f"bam{i}", nn.Identity())(x)
        x = self.avgpool(x) if self.faithful else x.mean((2, 3), keepdim=True)
        return self.fc(x.flatten(1))

    def set_faithful(self, faithful: bool) -> RefResNet:
        """``False``: global pooling in BAM's channel branch and the head (what Macula does on any input)."""
        self.faithful = faithful
        for module in self.modules():
            if isinstance(module, BamChannel):
                module.faithful = faithful
        return self

    def maps(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The last forward's ``(spatial (N,1,h,w), channel (N,C))`` per module, as Macula reports them."""
        found = {}
        for name, module in self.named_modules():
            if isinstance(module, RefCBAM):
                found[name] = (module.spatial, module.channel)
            elif isinstance(module, RefBAM):
                found[name] = (module.mask.mean(1, keepdim=True), module.mask.mean((2, 3)))
        return found


# ---------------------------------------------------------------------------------------- helpers


def randomised(model: RefResNet, seed: int) -> RefResNet:
    """Random BN affine parameters, then running statistics from one batch: nothing is at its default."""
    torch.manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = None  # cumulative average: after one batch the running stats are that batch's
        model.set_faithful(False).train()
        model(torch.randn(4, 3, 64, 64))
    return model.eval().set_faithful(True)


def save_like_the_authors(model: RefResNet, path: Path, *, legacy: bool) -> Path:
    """``torch.save`` of their training script's dict, DataParallel keys (``module.``); legacy = PyTorch 0.4."""
    optimizer = {"state": {}, "param_groups": [  # torch.optim.SGD(...).state_dict(), without importing dynamo
        {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False,
         "params": list(range(len(list(model.parameters()))))}]}
    state = {"epoch": 100, "arch": "resnet", "state_dict": OrderedDict(
        (f"module.{k}", v) for k, v in model.state_dict().items()), "best_prec1": torch.tensor(77.622),
        "optimizer": optimizer}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def convert_official(src: Path, out: Path, depth: int, attention: str) -> torch.nn.Module:
    assert main(["--from", "official", str(src), "--arch", f"resnet{depth}", "--attention", attention,
                 "--out", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert model.config["bam_variant"] == ("official" if attention == "bam" else "paper")
    assert meta.training["imported_from"] == "official" and meta.training["source_file"] == src.name
    return model


def assert_close(actual: Tensor, expected: Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=1e-4)


def assert_same_forward(reference: RefResNet, ours: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        expected = reference(x)
        logits, maps = ours.forward_with_attention(x)
    assert_close(logits, expected)
    ref_maps = reference.maps()
    assert list(maps) == list(ref_maps)
    for name, (spatial, channel) in ref_maps.items():
        assert_close(maps[name].spatial, spatial)
        assert_close(maps[name].channel, channel)


def source(tmp_path: Path, depth: int, attention: str, *, legacy: bool = False, seed: int = 0
           ) -> tuple[RefResNet, nn.Module]:
    reference = randomised(RefResNet(depth, attention.upper()), seed)
    src = save_like_the_authors(reference, tmp_path / f"RESNET{depth}_{attention.upper()}_model_best.pth.tar",
                                legacy=legacy)
    return reference, convert_official(src, tmp_path / "imported.safetensors", depth, attention)


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(("attention", "legacy"), [("cbam", True), ("bam", False)])
def test_square_input_matches_the_authors_forward(tmp_path, attention, legacy):
    reference, ours = source(tmp_path, 18, attention, legacy=legacy)
    assert_same_forward(reference, ours, torch.randn(2, 3, 224, 224))
    _, meta = load_checkpoint(tmp_path / "imported.safetensors")
    assert (meta.training["source_epoch"], meta.training["source_arch"]) == (100, "resnet")
    assert meta.training["source_best_prec1"] == pytest.approx(77.622)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["cbam", "bam"])
def test_the_released_resnet50_layouts_match(tmp_path, attention):
    reference, ours = source(tmp_path, 50, attention, seed=1)
    assert_same_forward(reference, ours, torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("attention", ["cbam", "bam"])
def test_non_square_input_matches_with_global_pooling(tmp_path, attention):
    reference, ours = source(tmp_path, 18, attention, seed=2)
    assert_same_forward(reference.set_faithful(False), ours, torch.randn(2, 3, 64, 96))


def test_the_authors_fixed_windows_differ_on_non_square_input(tmp_path):
    """Documented in docs/models.md: their H×H BAM window and AvgPool2d(7) head see part of a wide map."""
    reference, ours = source(tmp_path, 18, "bam", seed=3)
    x = torch.randn(1, 3, 224, 288)  # last feature map 7×9: AvgPool2d(7) averages its left 7×7
    with torch.no_grad():
        faithful, (logits, maps) = reference(x), ours.forward_with_attention(x)
        bam1 = reference.maps()["bam1"][1]
        assert not torch.allclose(logits, faithful, atol=1e-3, rtol=1e-3)
        assert not torch.allclose(maps["bam1"].channel, bam1, atol=1e-3, rtol=1e-3)
    assert_same_forward(reference.set_faithful(False), ours, x)


def test_num_batches_tracked_may_be_absent(tmp_path):
    """Files written before PyTorch 0.4.1 have no num_batches_tracked; eval does not use it."""
    reference = randomised(RefResNet(18, "CBAM"), 4)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    src = tmp_path / "old.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, src)
    ours = convert_official(src, tmp_path / "old.safetensors", 18, "cbam")
    assert_same_forward(reference, ours, torch.randn(1, 3, 224, 224))
