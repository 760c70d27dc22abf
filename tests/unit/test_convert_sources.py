"""``--from timm`` and ``--from torchvision``: files saved by those projects convert to the same forward.

Sources are real ``timm`` and ``torchvision`` models with random weights and non-default BatchNorm
statistics, saved the way each project saves them; logits and attention maps are compared in float32
on square and non-square inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.models import save_for_hf
from timm.utils import CheckpointSaver
from torch import Tensor, nn

from models import create_model, load_checkpoint
from models.convert import ConvertError, convert

INPUTS = [(64, 64), (64, 96)]  # square and non-square


def with_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters, then running statistics from one batch."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = None  # cumulative average: after one batch the running stats are that batch's
        model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


def assert_close(actual: Tensor, expected: Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=1e-4)


def imported(source: str, src: Path, arch: str, attention: str, tmp_path: Path) -> nn.Module:
    convert(source, src, arch=arch, attention=attention, out=tmp_path / "imported.safetensors")
    model, _ = load_checkpoint(tmp_path / "imported.safetensors")
    return model


# ----------------------------------------------------------------------------------------------- timm


def timm_cbam_resnet(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return with_statistics(timm.create_model(name, block_args=dict(attn_layer="cbam")), seed)


def timm_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Logits, and each CBAM's ``(spatial, channel)`` gate outputs read by hooks on its sigmoids."""
    gates: dict[tuple[str, str], Tensor] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, key=(name.rsplit(".", 2)[0], kind): gates.update(
        {key: out})) for name, module in model.named_modules() for kind in ("channel", "spatial")
        if name.endswith(f".se.{kind}.gate")]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    blocks = dict.fromkeys(block for block, _ in gates)
    return logits, {f"{b[: -len('.se')]}.cbam": (gates[b, "spatial"], gates[b, "channel"].flatten(1)) for b in blocks}


def save_timm(model: nn.Module, form: str, tmp_path: Path) -> Path:
    """``save_for_hf`` (the Hub's model.safetensors / pytorch_model.bin) or train.py's ``CheckpointSaver``."""
    if form in ("safetensors", "bin"):
        save_for_hf(model, str(tmp_path / "hf"), safe_serialization="both")
        return tmp_path / "hf" / ("model.safetensors" if form == "safetensors" else "pytorch_model.bin")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saver = CheckpointSaver(model, optimizer, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=7, metric=71.5)
    return tmp_path / "model_best.pth.tar"


@pytest.mark.parametrize(("name", "form"), [("resnet18", "safetensors"), ("resnet18", "bin"),
                                            ("resnet18", "train-checkpoint"),
                                            pytest.param("resnet50", "safetensors", marks=pytest.mark.slow)])
def test_timm_cbam_resnet_matches_timm(tmp_path, name, form):
    source = timm_cbam_resnet(name, seed=0)
    ours = imported("timm", save_timm(source, form, tmp_path), name, "cbam", tmp_path)
    for size in INPUTS:
        x = torch.randn(2, 3, *size)
        expected, expected_maps = timm_forward(source, x)
        with torch.no_grad():
            logits, maps = ours.forward_with_attention(x)
        assert_close(logits, expected)
        assert list(maps) == list(expected_maps)
        for module, (spatial, channel) in expected_maps.items():
            assert_close(maps[module].spatial, spatial)
            assert_close(maps[module].channel, channel)


def test_timm_mlp_has_zero_biases_and_swapped_spatial_inputs(tmp_path):
    source = timm_cbam_resnet("resnet18", seed=1)
    ours = imported("timm", save_timm(source, "safetensors", tmp_path), "resnet18", "cbam", tmp_path)
    theirs, mine = source.layer2[1].se, ours.layer2[1].cbam
    assert torch.equal(mine.channel_gate.mlp[0].bias, torch.zeros(8))
    assert torch.equal(mine.channel_gate.mlp[2].weight, theirs.channel.fc2.weight[:, :, 0, 0])
    spatial = theirs.spatial.conv.conv.weight
    assert torch.equal(mine.spatial_gate.conv.weight, torch.cat((spatial[:, 1:], spatial[:, :1]), dim=1))


def test_timm_squeeze_excitation_is_refused_with_its_keys(tmp_path):
    torch.manual_seed(0)
    save_for_hf(timm.create_model("resnet18", block_args=dict(attn_layer="se")), str(tmp_path / "hf"),
                safe_serialization=True)
    with pytest.raises(ConvertError, match=r"unexpected keys .*layer1\.0\.se\.fc1\.weight") as err:
        convert("timm", tmp_path / "hf" / "model.safetensors", arch="resnet18", attention="cbam",
                out=tmp_path / "x.safetensors")
    assert "missing keys" in str(err.value) and "layer1.0.cbam.channel_gate.mlp.0.weight" in str(err.value)
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------- torchvision


def torchvision_resnet(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return with_statistics(getattr(torchvision.models, name)(weights=None), seed)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_torchvision_resnet_matches_torchvision(tmp_path, name):
    source = torchvision_resnet(name, seed=2)
    torch.save(source.state_dict(), tmp_path / f"{name}.pth")  # as the torchvision weights files are saved
    ours = imported("torchvision", tmp_path / f"{name}.pth", name, "none", tmp_path)
    for size in INPUTS:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            logits, maps = ours.forward_with_attention(x)
            assert_close(logits, source(x))
        assert maps == {}


@pytest.mark.parametrize("attention", ["cbam", "bam"])
def test_torchvision_backbone_takes_every_tensor_and_attention_keeps_its_init(tmp_path, attention):
    source = torchvision_resnet("resnet18", seed=3)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    ours = imported("torchvision", tmp_path / "resnet18.pth", "resnet18", attention, tmp_path).state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(ours[key], value), key
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = create_model("resnet18", attention=attention).state_dict()
    attention_keys = [k for k in ours if k not in source.state_dict()]
    assert attention_keys and all(torch.equal(ours[k], fresh[k]) for k in attention_keys)
