"""--init-from torchvision:PATH: a torchvision ResNet state dict loads into the backbone."""

from __future__ import annotations

import pytest
import torch
import torchvision

from models import create_model
from training.pretrained import InitFromError, load_torchvision_backbone


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_backbone_loads_attention_and_new_head_keep_their_init(resnet18_file):
    source = torch.load(resnet18_file, weights_only=True)
    model = create_model("resnet18", attention="cbam", num_classes=7)
    attention_before = {k: v.clone() for k, v in model.state_dict().items() if ".cbam." in k}
    loaded = load_torchvision_backbone(model, f"torchvision:{resnet18_file}")
    state = model.state_dict()
    assert loaded == {k for k in source if not k.startswith("fc.")}  # fc: 1000 classes vs 7, skipped
    assert all(torch.equal(state[k], source[k]) for k in loaded)
    assert all(torch.equal(state[k], v) for k, v in attention_before.items())


def test_bam_model_loads_the_whole_backbone_with_the_same_head(resnet18_file):
    model = create_model("resnet18", attention="bam", num_classes=1000)
    loaded = load_torchvision_backbone(model, f"torchvision:{resnet18_file}")
    assert "fc.weight" in loaded and "layer4.1.bn2.running_var" in loaded


def test_bad_sources_are_clear_errors(resnet18_file, tmp_path):
    model = create_model("resnet20", attention=None, num_classes=10)
    with pytest.raises(InitFromError, match="torchvision:PATH"):
        load_torchvision_backbone(model, str(resnet18_file))
    with pytest.raises(InitFromError, match="no such file"):
        load_torchvision_backbone(model, f"torchvision:{tmp_path / 'missing.pth'}")
    with pytest.raises(InitFromError, match="no tensor matches"):  # a CIFAR resnet20 is not a resnet18
        load_torchvision_backbone(model, f"torchvision:{resnet18_file}")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(InitFromError, match="weights-only"):
        load_torchvision_backbone(model, f"torchvision:{tmp_path / 'junk.pth'}")
