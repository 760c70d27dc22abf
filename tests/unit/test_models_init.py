"""Starting weights: Macula's rule, the BAM/CBAM authors' rule, zero_init_residual; what the network does at step 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models import Preprocessing, create_model, load_checkpoint, save_checkpoint
from models.attention import CbamSpatialGate
from models.resnet import BasicBlock, Bottleneck


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, **kwargs)


def spatial_gate_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m.bn for m in model.modules() if isinstance(m, CbamSpatialGate)]


def shortcut_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for name, m in model.named_modules() if ".downsample." in f".{name}." and isinstance(m, nn.Conv2d)]


def fan(weight: torch.Tensor, mode: str) -> int:
    receptive = weight[0, 0].numel() if weight.ndim > 2 else 1
    return (weight.shape[0] if mode == "fan_out" else weight.shape[1]) * receptive


def pooled_std(weights: list[torch.Tensor], mode: str) -> float:
    """Std of every weight divided by He's std for its layer: 1 when every layer is He-normal by ``mode``."""
    scaled = [w.flatten() / math.sqrt(2.0 / fan(w, mode)) for w in weights]
    return torch.cat(scaled).std().item()


OFFICIAL_CASES = [("resnet18", {"attention": "cbam"}), ("resnet20", {"attention": "cbam"}),
                  ("resnet18", {"attention": "bam"}), ("resnet50", {"attention": "bam", "bam_variant": "official"})]


@pytest.mark.parametrize(("name", "kwargs"), OFFICIAL_CASES, ids=str)
def test_official_init_values_per_module(name: str, kwargs: dict) -> None:
    model = build(name, init="official", **kwargs)
    gates, shortcuts = set(map(id, spatial_gate_bns(model))), set(map(id, shortcut_convs(model)))
    assert len(gates) == (0 if kwargs["attention"] == "bam" else sum(1 for _ in model.modules()
                                                                     if isinstance(_, BasicBlock | Bottleneck)))
    convs = []
    for module_name, m in model.named_modules():
        bias = getattr(m, "bias", None)
        if isinstance(bias, nn.Parameter):
            assert torch.count_nonzero(bias) == 0, f"{module_name}.bias"
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            assert torch.all(m.weight == (0.0 if id(m) in gates else 1.0)), module_name
        elif isinstance(m, nn.Conv2d) and id(m) not in shortcuts:
            convs.append(m.weight.detach())
    assert pooled_std(convs, "fan_out") == pytest.approx(1.0, rel=0.02)
    assert pooled_std([model.fc.weight.detach()], "fan_in") == pytest.approx(1.0, rel=0.1)


def test_official_init_leaves_the_shortcut_conv_and_attention_mlps_at_the_pytorch_default() -> None:
    model = build("resnet18", init="official", attention="cbam")
    default = [m.weight for m in shortcut_convs(model)]
    default += [m.weight for name, m in model.named_modules() if ".cbam." in name and isinstance(m, nn.Linear)]
    assert len(default) == 3 + 8 * 2
    for w in default:  # kaiming_uniform(a=√5): U(±1/√fan_in), std = bound/√3
        bound = 1 / math.sqrt(fan(w, "fan_in"))
        assert w.abs().max() <= bound
    pooled = torch.cat([w.detach().flatten() * math.sqrt(3 * fan(w, "fan_in")) for w in default])
    assert pooled.std().item() == pytest.approx(1.0, rel=0.05)


def test_macula_init_is_the_default_and_unchanged() -> None:
    model = build("resnet18", attention="cbam")
    assert model.config["init"] == "macula" and model.config["zero_init_residual"] is False
    assert all(torch.all(bn.weight == 1) for bn in spatial_gate_bns(model))
    assert pooled_std([m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)],
                      "fan_out") == pytest.approx(1.0, rel=0.02)  # shortcut conv included
    assert torch.count_nonzero(model.fc.bias) > 0  # fc at PyTorch's default


@pytest.mark.parametrize("init", ["macula", "official"])
@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_zero_init_residual_zeroes_the_last_bn_of_every_block(init: str, name: str) -> None:
    model = build(name, attention="cbam", init=init, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    assert blocks
    for block in blocks:
        last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert torch.count_nonzero(last.weight) == 0
        assert torch.all(block.bn1.weight == 1)


def test_unknown_init_is_refused() -> None:
    with pytest.raises(ValueError, match="init must be"):
        create_model("resnet20", init="xavier")


# ---------------------------------------------------------------------------------- behaviour at step 0


def copy_backbone(src: nn.Module, dst: nn.Module) -> None:
    """Load ``src``'s weights into ``dst``: every tensor ``dst`` lacks must be attention's."""
    result = dst.load_state_dict(src.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".cbam." in k for k in result.missing_keys)


def scaled_plain(plain: nn.Module, cbam: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook ``plain`` so each block's residual branch (bn2's output F) becomes ``0.5 · Mc(F) ⊗ F``, with Mc taken
    from the matching CBAM block: what the CBAM network computes if its spatial gate is the constant 0.5."""
    blocks = [[m for m in net.modules() if isinstance(m, BasicBlock)] for net in (plain, cbam)]
    pairs = list(zip(*blocks, strict=True))

    def hook(gate):
        return lambda module, args, out: out * 0.5 * gate(out)[:, :, None, None]

    return [p.bn2.register_forward_hook(hook(c.cbam.channel_gate)) for p, c in pairs]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_official_cbam_starts_as_a_plain_resnet_scaled_per_block(mode: str) -> None:
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    plain = build("resnet20", seed=1).double()
    for init, spatial_is_constant in (("official", True), ("macula", False)):
        cbam = build("resnet20", attention="cbam", init=init).double()
        copy_backbone(plain, cbam)
        plain.train(mode == "train"), cbam.train(mode == "train")
        with torch.no_grad():
            logits, maps = cbam.forward_with_attention(x)
            hooks = scaled_plain(plain, cbam)
            expected = plain(x)
            for h in hooks:
                h.remove()
        assert len(maps) == 9
        assert all(torch.all(m.spatial == 0.5) for m in maps.values()) is spatial_is_constant, init
        assert torch.allclose(logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max()) is spatial_is_constant


def test_zero_init_residual_cbam_starts_equal_to_the_plain_network() -> None:
    plain = build("resnet20", seed=1, init="official", zero_init_residual=True)
    cbam = build("resnet20", attention="cbam", init="official", zero_init_residual=True)
    copy_backbone(plain, cbam)
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):
        plain.train(mode), cbam.train(mode)
        with torch.no_grad():
            assert torch.equal(cbam(x), plain(x))


# ------------------------------------------------------------------------------------ checkpoint, CLI


def test_checkpoint_records_the_init_and_old_checkpoints_load(tmp_path: Path) -> None:
    model = build("resnet20", attention="cbam", init="official", zero_init_residual=True).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, class_names=[str(i) for i in range(10)])
    loaded, meta = load_checkpoint(path)
    assert meta.arch["init"] == "official" and meta.arch["zero_init_residual"] is True
    with safe_open(str(path), framework="pt") as f:
        raw, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    old_arch = {k: v for k, v in json.loads(raw["arch"]).items() if k not in ("init", "zero_init_residual")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**raw, "arch": json.dumps(old_arch)})
    old_model, old_meta = load_checkpoint(old)
    assert "init" not in old_meta.arch
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(old_model(x), model(x)) and torch.equal(loaded(x), model(x))


def test_training_cli_flags_reach_the_model() -> None:
    from training.cli import config_from_args, parser
    from training.config import TrainConfig
    from training.data import DataBundle
    from training.trainer import build_model

    config, _ = config_from_args(parser().parse_args(["--init", "official", "--zero-init-residual"]))
    assert (config.init, config.zero_init_residual) == ("official", True)
    assert TrainConfig().init == "macula" and not TrainConfig().zero_init_residual
    pre = Preprocessing(input_size=(48, 48), resize_mode="stretch", resize_size=48, mean=(0.1,), std=(0.3,),
                        color="L")
    bundle = DataBundle(None, None, None, [str(i) for i in range(10)], pre, {})
    model, _ = build_model(config, bundle)
    assert model.config["init"] == "official" and model.config["zero_init_residual"] is True
    assert all(torch.all(bn.weight == 0) for bn in spatial_gate_bns(model))
