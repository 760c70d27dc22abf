"""Attention maps, BAM/CBAM equations, batch independence and gradient flow."""

from __future__ import annotations

import pytest
import torch

from models import BAM, CBAM, create_model
from models.attention import AttentionModule

# (name, kwargs, input size): small networks that still cover both block types and both stems.
SMALL = [
    ("resnet20", {"attention": "cbam", "num_classes": 10}, (32, 32)),
    ("resnet20", {"attention": "bam", "num_classes": 10}, (32, 32)),
    ("resnet18", {"attention": "cbam", "num_classes": 10, "stem": "cifar"}, (24, 40)),
    ("resnet18", {"attention": "bam", "bam_variant": "official", "num_classes": 10}, (64, 96)),
    ("resnet50", {"attention": "cbam", "num_classes": 10}, (64, 64)),
    ("resnet50", {"attention": "bam", "num_classes": 10}, (96, 64)),
]


def build(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def feature_shapes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Size]:
    """The shape of the feature map each attention module receives, recorded by forward hooks."""
    shapes: dict[str, torch.Size] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: shapes.__setitem__(name, args[0].shape))
             for name, m in model.named_modules() if isinstance(m, AttentionModule)]
    model(x)
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize(("name", "kwargs", "size"), SMALL, ids=lambda v: str(v))
def test_maps_count_order_range_and_resolution(name: str, kwargs: dict, size: tuple[int, int]) -> None:
    model = build(name, kwargs).eval()
    x = torch.randn(3, 3, *size)
    with torch.inference_mode():
        logits, maps = model.forward_with_attention(x)
        assert torch.equal(logits, model(x))
        expected = feature_shapes(model, x)
    module_names = [n for n, m in model.named_modules() if isinstance(m, AttentionModule)]
    assert list(maps) == module_names == list(expected)  # one per module, in network order
    for key, m in maps.items():
        n, c, h, w = expected[key]
        assert m.spatial.shape == (n, 1, h, w), key
        assert m.channel.shape == (n, c), key
        for t in m:
            assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1, key


def test_map_keys_and_resolutions_resnet20_cbam() -> None:
    model = create_model("resnet20", attention="cbam", num_classes=10).eval()
    with torch.inference_mode():
        _, maps = model.forward_with_attention(torch.randn(1, 3, 32, 32))
    assert list(maps) == [f"layer{s}.{i}.cbam" for s in (1, 2, 3) for i in range(3)]
    assert [m.spatial.shape[-1] for m in maps.values()] == [32] * 3 + [16] * 3 + [8] * 3
    assert [m.channel.shape[-1] for m in maps.values()] == [16] * 3 + [32] * 3 + [64] * 3


def test_map_keys_and_resolutions_resnet18_bam() -> None:
    model = create_model("resnet18", attention="bam").eval()
    with torch.inference_mode():
        _, maps = model.forward_with_attention(torch.randn(1, 3, 224, 160))
    assert list(maps) == ["bam1", "bam2", "bam3"]
    assert [tuple(m.spatial.shape[-2:]) for m in maps.values()] == [(56, 40), (28, 20), (14, 10)]
    assert [m.channel.shape[-1] for m in maps.values()] == [64, 128, 256]


def test_no_attention_gives_no_maps() -> None:
    model = create_model("resnet20", num_classes=10).eval()
    with torch.inference_mode():
        logits, maps = model.forward_with_attention(torch.randn(2, 3, 32, 32))
    assert maps == {} and logits.shape == (2, 10)


@pytest.mark.parametrize(("name", "kwargs", "size"), SMALL, ids=lambda v: str(v))
def test_eval_output_does_not_depend_on_the_batch(name: str, kwargs: dict, size: tuple[int, int]) -> None:
    model = build(name, kwargs).eval()
    # Non-trivial BN statistics, so eval mode differs clearly from train mode.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, *size))
    model.eval()
    batch = torch.randn(8, 3, *size)
    with torch.inference_mode():
        logits, maps = model.forward_with_attention(batch)
        for i in (0, 5):
            alone, alone_maps = model.forward_with_attention(batch[i:i + 1])
            torch.testing.assert_close(alone[0], logits[i], atol=1e-4, rtol=1e-4)
            for key, m in maps.items():
                torch.testing.assert_close(alone_maps[key].spatial[0], m.spatial[i], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(alone_maps[key].channel[0], m.channel[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "kwargs", "size"), SMALL[:4], ids=lambda v: str(v))
def test_gradient_reaches_every_attention_parameter(name: str, kwargs: dict, size: tuple[int, int]) -> None:
    model = build(name, kwargs).train()
    # resnet20's CBAM MLP has C/16 = 1 hidden unit; at random init its ReLU can be dead for a whole batch,
    # which is about the weights, not the wiring. A positive hidden bias keeps every unit alive.
    for module in model.modules():
        if isinstance(module, AttentionModule):
            torch.nn.init.constant_(module.channel_gate.mlp[0].bias, 1.0)
    logits = model(torch.randn(4, 3, *size))
    torch.nn.functional.cross_entropy(logits, torch.arange(4) % 10).backward()
    attention = [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionModule)]
    assert attention
    for module_name, module in attention:
        for param_name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{module_name}.{param_name}"


# ---------------------------------------------------------------------------- equations, module level


def randomize_bn(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_bam_combination(variant: str) -> None:
    torch.manual_seed(0)
    bam = BAM(64, variant=variant)
    randomize_bn(bam)
    bam.eval()
    x = torch.randn(2, 64, 9, 9)
    maps = {}
    with torch.inference_mode():
        out = bam(x, maps)
        mc, ms = bam.channel_gate(x), bam.spatial_gate(x)
    assert mc.shape == (2, 64, 1, 1) and ms.shape == (2, 1, 9, 9)
    mask = torch.sigmoid(mc * ms) if variant == "official" else torch.sigmoid(mc + ms)
    torch.testing.assert_close(out, x * (1 + mask))  # F' = F + F ⊗ M(F)
    (m,) = maps.values()
    torch.testing.assert_close(m.spatial, mask.expand(-1, -1, 9, 9).mean(dim=1, keepdim=True))
    torch.testing.assert_close(m.channel, mask.expand(-1, -1, 9, 9).mean(dim=(2, 3)))


def test_bam_official_layout() -> None:
    bam = BAM(64, variant="official")
    kinds = [type(m).__name__ for m in bam.channel_gate.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    kinds = [type(m).__name__ for m in bam.spatial_gate.body]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3 + ["Conv2d"]
    dilations = [m.dilation for m in bam.spatial_gate.body if isinstance(m, torch.nn.Conv2d)]
    assert dilations == [(1, 1), (4, 4), (4, 4), (1, 1)]
    with pytest.raises(ValueError, match="bam_variant"):
        BAM(64, variant="authors")


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("hw", [(7, 13), (13, 7), (1, 5), (3, 3)])
def test_bam_non_square_feature_maps(variant: str, hw: tuple[int, int]) -> None:
    """The authors' BAM pools with kernel_size=H and fails on non-square maps; ours must not."""
    bam = BAM(32, variant=variant).eval()
    x = torch.randn(2, 32, *hw)
    with torch.inference_mode():
        out = bam(x)
        mc = bam.channel_gate(x)
    assert out.shape == x.shape
    torch.testing.assert_close(mc, bam.channel_gate.mlp(x.mean(dim=(2, 3)))[:, :, None, None])


def test_cbam_equations() -> None:
    torch.manual_seed(0)
    cbam = CBAM(32)
    randomize_bn(cbam)
    cbam.eval()
    x = torch.randn(2, 32, 6, 10)
    maps = {}
    with torch.inference_mode():
        out = cbam(x, maps)
        mlp = cbam.channel_gate.mlp
        mc = torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))
        f1 = x * mc[:, :, None, None]
        sg = cbam.spatial_gate
        pooled = torch.cat([f1.amax(dim=1, keepdim=True), f1.mean(dim=1, keepdim=True)], dim=1)
        ms = torch.sigmoid(sg.bn(sg.conv(pooled)))
    torch.testing.assert_close(out, f1 * ms)
    (m,) = maps.values()
    torch.testing.assert_close(m.channel, mc)
    torch.testing.assert_close(m.spatial, ms)
    assert cbam.spatial_gate.conv.bias is None and cbam.spatial_gate.conv.padding == (3, 3)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"] and mlp[0].out_features == 2


def test_cbam_in_every_block_before_the_add() -> None:
    model = create_model("resnet18", attention="cbam")
    names = [n for n, m in model.named_modules() if isinstance(m, CBAM)]
    assert names == [f"layer{s}.{i}.cbam" for s in (1, 2, 3, 4) for i in (0, 1)]
    model = create_model("resnet50", attention="bam")
    assert [n for n, m in model.named_modules() if isinstance(m, BAM)] == ["bam1", "bam2", "bam3"]


def test_bad_attention_name() -> None:
    with pytest.raises(ValueError, match="attention"):
        create_model("resnet20", attention="se")
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("resnet21")


def test_cbam_fused_residual_equals_gate_plus_add() -> None:
    torch.manual_seed(0)
    cbam = CBAM(32)
    randomize_bn(cbam)
    cbam.eval()
    x, identity = torch.randn(2, 32, 5, 9), torch.randn(2, 32, 5, 9)
    x_before = x.clone()
    expected = cbam(x) + identity
    torch.testing.assert_close(cbam(x, residual=identity), expected)  # autograd on: x is left alone
    assert torch.equal(x, x_before)
    with torch.inference_mode():
        x_inf = x.clone()
        torch.testing.assert_close(cbam(x_inf, residual=identity), expected)  # may overwrite x_inf


@pytest.mark.parametrize("attention", ["bam", "cbam"])
def test_inference_path_equals_autograd_path(attention: str) -> None:
    """The in-place/fused inference path gives the logits and maps of the autograd path."""
    model = build("resnet18", {"attention": attention, "num_classes": 10, "stem": "cifar"})
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    logits, maps = model.forward_with_attention(x)  # autograd on
    with torch.inference_mode():
        logits_inf, maps_inf = model.forward_with_attention(x)
        plain_inf = model(x)
    torch.testing.assert_close(logits_inf, logits.detach())
    torch.testing.assert_close(plain_inf, logits.detach())
    for key, m in maps.items():
        torch.testing.assert_close(maps_inf[key].spatial, m.spatial.detach())
        torch.testing.assert_close(maps_inf[key].channel, m.channel.detach())


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    from models.resnet import PadShortcut

    x = torch.randn(2, 4, 7, 10)
    out = PadShortcut(4)(x)
    assert out.shape == (2, 8, 4, 5)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 6:].any()
