"""Output shapes for every architecture × attention, and the parameter counts of the official code."""

from __future__ import annotations

import pytest
import torch

from models import create_model, list_models

ATTENTIONS = [None, "bam", "cbam"]
IMAGENET_NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CIFAR_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
# (batch, height, width): small sizes with batch 2 (BatchNorm-free eval path, but batch > 1 catches
# flatten/view bugs), 224² with batch 1 only (deep nets at 224² are slow on 2 CPU cores).
SIZES = [(2, 32, 32), (2, 64, 64), (1, 224, 224), (2, 48, 80)]


def test_list_models_has_every_name() -> None:
    assert list_models() == IMAGENET_NAMES + CIFAR_NAMES


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", IMAGENET_NAMES + CIFAR_NAMES)
def test_logits_and_maps_shape_at_every_size(name: str, attention: str | None) -> None:
    torch.manual_seed(0)
    model = create_model(name, attention=attention, num_classes=7).eval()
    with torch.inference_mode():
        for n, h, w in SIZES:
            logits, maps = model.forward_with_attention(torch.randn(n, 3, h, w))
            assert logits.shape == (n, 7), (h, w)
            assert torch.isfinite(logits).all(), (h, w)
            assert all(m.spatial.shape[0] == n and m.channel.shape[0] == n for m in maps.values())


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cifar_stem_on_imagenet_names(attention: str | None) -> None:
    model = create_model("resnet18", attention=attention, num_classes=10, stem="cifar").eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert model(torch.randn(2, 3, 24, 40)).shape == (2, 10)


def test_in_chans_one() -> None:
    model = create_model("resnet20", attention="cbam", num_classes=10, in_chans=1).eval()
    with torch.inference_mode():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def count(name: str, **kwargs) -> int:
    with torch.device("meta"):  # no memory, no init: counts are all we need
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


# Numbers of the authors' released code (Jongchan/attention-module) and torchvision.
OFFICIAL_COUNTS = [
    ("resnet18", {}, 11_689_512),
    ("resnet18", {"attention": "cbam"}, 11_779_392),
    ("resnet18", {"attention": "bam", "bam_variant": "official"}, 11_712_503),
    ("resnet50", {}, 25_557_032),
    ("resnet50", {"attention": "cbam"}, 28_089_624),
    ("resnet50", {"attention": "bam", "bam_variant": "official"}, 25_915_099),
    ("resnet101", {"attention": "cbam"}, 49_330_172),
    ("resnet18", {"stem": "cifar", "num_classes": 10}, 11_173_962),
    ("resnet18", {"stem": "cifar", "num_classes": 10, "attention": "cbam"}, 11_263_842),
    ("resnet18", {"stem": "cifar", "num_classes": 10, "attention": "bam", "bam_variant": "official"}, 11_196_953),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), OFFICIAL_COUNTS)
def test_parameter_count_matches_official_code(name: str, kwargs: dict, expected: int) -> None:
    assert count(name, **kwargs) == expected


# The paper form (BAM eq. 2-3: one BN at the end of each branch, BN1d over C channels in the channel branch,
# instead of the official code's BN after the hidden layer and after each intermediate conv) differs in its
# BatchNorm parameters only; these are the counts the README states.
PAPER_BAM_COUNTS = [
    ("resnet18", {}, 11_713_181),
    ("resnet34", {}, 21_821_341),
    ("resnet50", {}, 25_917_793),
    ("resnet101", {}, 44_909_921),
    ("resnet152", {}, 60_553_569),
    ("resnet18", {"stem": "cifar", "num_classes": 10}, 11_197_631),
    ("resnet20", {"num_classes": 10}, 270_217),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), PAPER_BAM_COUNTS)
def test_parameter_count_paper_bam(name: str, kwargs: dict, expected: int) -> None:
    assert count(name, attention="bam", **kwargs) == expected


def test_resnet20_counts() -> None:
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (option A shortcuts are parameter-free).
    assert count("resnet20", num_classes=10) == 269_722
