"""BatchNorm folding: same logits and masks as the model it came from, no BN left, eval mode only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import create_model
from models.fusion import count_batchnorms, fold_batchnorm

CASES = [
    ("resnet20", {"attention": "cbam", "num_classes": 10}, (32, 32)),
    ("resnet18", {"attention": None, "num_classes": 10}, (64, 64)),
    ("resnet18", {"attention": "bam", "bam_variant": "official", "num_classes": 10}, (64, 96)),
    ("resnet50", {"attention": "cbam", "num_classes": 10}, (64, 64)),
    ("resnet50", {"attention": "bam", "num_classes": 10}, (96, 64)),
]


def trained_looking(name: str, kwargs: dict) -> nn.Module:
    """A model whose BNs are not the identity (fresh BNs would make folding trivially right)."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def forward_both(name: str, kwargs: dict, size: tuple[int, int], dtype: torch.dtype):
    """``(model's logits and maps, folded model's logits and maps)`` for one random batch, in ``dtype``."""
    model = trained_looking(name, kwargs).to(dtype)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert count_batchnorms(model) > 0 and count_batchnorms(folded) == 0
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.inference_mode():
        return model.forward_with_attention(x), folded.forward_with_attention(x)


@pytest.mark.parametrize(("name", "kwargs", "size"), CASES, ids=lambda v: str(v))
def test_folding_is_exact_in_float64(name: str, kwargs: dict, size: tuple[int, int]) -> None:
    """Folding is an identity of real arithmetic, so in float64 only rounding (~1e-15 relative) may differ.

    A wrong fold (a missing eps, a bias off by the mean) moves the outputs by ~1e-5 relative or more.
    """
    (logits, maps), (folded_logits, folded_maps) = forward_both(name, kwargs, size, torch.float64)
    torch.testing.assert_close(folded_logits, logits, rtol=0, atol=1e-10 * logits.abs().max().item())
    assert list(folded_maps) == list(maps)
    for key, m in maps.items():  # masks lie in [0, 1]
        torch.testing.assert_close(folded_maps[key].spatial, m.spatial, rtol=0, atol=1e-10)
        torch.testing.assert_close(folded_maps[key].channel, m.channel, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("name", "kwargs", "size"), CASES, ids=lambda v: str(v))
def test_folded_model_in_float32_differs_by_rounding_only(name: str, kwargs: dict, size: tuple[int, int]) -> None:
    """As served (float32), on any CPU and thread count: logits within 1e-4 of their largest magnitude, masks
    within 1e-3 (a quarter of one level of the 8-bit PNG masks). Kernels differ between CPUs (AVX2, AVX-512,
    NEON) and thread counts, and so does the rounding: the largest differences seen were 3e-6 and 7e-5."""
    (logits, maps), (folded_logits, folded_maps) = forward_both(name, kwargs, size, torch.float32)
    torch.testing.assert_close(folded_logits, logits, rtol=0, atol=1e-4 * logits.abs().max().item())
    for key, m in maps.items():
        torch.testing.assert_close(folded_maps[key].spatial, m.spatial, rtol=0, atol=1e-3)
        torch.testing.assert_close(folded_maps[key].channel, m.channel, rtol=0, atol=1e-3)


def test_folding_a_training_model_is_refused() -> None:
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(create_model("resnet20", attention="cbam", num_classes=10))


def test_a_bn_that_does_not_follow_a_conv_is_left_alone() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)).eval()
    assert count_batchnorms(fold_batchnorm(model)) == 1
