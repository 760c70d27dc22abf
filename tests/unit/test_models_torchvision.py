"""A torchvision ResNet state dict loads into our backbone (keys, shapes, and outputs)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from models import create_model


def torchvision_resnet(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None, num_classes=1000)
    reference.train()
    with torch.no_grad():  # non-default running statistics, so loading them is tested too
        reference(torch.randn(4, 3, 64, 64))
    return reference.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_plain_backbone_loads_strictly_and_matches(name: str) -> None:
    reference = torchvision_resnet(name)
    ours = create_model(name)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["bam", "cbam"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_attention_backbone_misses_only_attention_keys(name: str, attention: str) -> None:
    reference = torchvision_resnet(name)
    ours = create_model(name, attention=attention)
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys
    marker = "bam" if attention == "bam" else ".cbam."
    assert all(marker in key for key in result.missing_keys), result.missing_keys
    # BatchNorm fills in a missing num_batches_tracked itself and does not report it
    attention_keys = {k for k in ours.state_dict() if marker in k and not k.endswith("num_batches_tracked")}
    assert set(result.missing_keys) == attention_keys
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
