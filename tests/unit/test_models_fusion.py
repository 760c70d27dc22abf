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


@pytest.mark.parametrize(("name", "kwargs", "size"), CASES, ids=lambda v: str(v))
def test_folded_model_gives_the_same_logits_and_masks(name: str, kwargs: dict, size: tuple[int, int]) -> None:
    model = trained_looking(name, kwargs)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert count_batchnorms(model) > 0 and count_batchnorms(folded) == 0
    x = torch.randn(3, 3, *size)
    with torch.inference_mode():
        logits, maps = model.forward_with_attention(x)
        folded_logits, folded_maps = folded.forward_with_attention(x)
    torch.testing.assert_close(folded_logits, logits, rtol=1e-4, atol=1e-4)
    assert list(folded_maps) == list(maps)
    for key, m in maps.items():
        torch.testing.assert_close(folded_maps[key].spatial, m.spatial, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(folded_maps[key].channel, m.channel, rtol=1e-4, atol=1e-5)


def test_folding_a_training_model_is_refused() -> None:
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(create_model("resnet20", attention="cbam", num_classes=10))


def test_a_bn_that_does_not_follow_a_conv_is_left_alone() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)).eval()
    assert count_batchnorms(fold_batchnorm(model)) == 1
