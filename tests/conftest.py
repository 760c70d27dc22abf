"""Fixtures shared by every test area. Area-specific fixtures live beside their tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models import Preprocessing, create_model, save_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))
# Services started by tests serve eager unless a test asks for the compiled form (tests/*/test_compile*.py): a
# background compile per started service would cost CI minutes. Child processes inherit this too.
os.environ.setdefault("MACULA_COMPILE", "off")
# Likewise they keep the fixed batch cap and memory format (MACULA_TUNE=off) unless a test asks for tuning
# (tests/*/test_tuning*.py): timing every started service's model would cost seconds each.
os.environ.setdefault("MACULA_TUNE", "off")


def make_checkpoint(path: Path, *, arch: str = "resnet20", attention: str | None = "cbam", num_classes: int = 10,
                    color: str = "L", size: int = 32, seed: int = 0) -> Path:
    """A random-weight checkpoint (fast to build and to run) with stretch preprocessing."""
    torch.manual_seed(seed)
    channels = 1 if color == "L" else 3
    model = create_model(arch, attention=attention, num_classes=num_classes, in_chans=channels)
    pre = Preprocessing(input_size=(size, size), resize_mode="stretch", resize_size=size,
                        mean=(0.5,) * channels, std=(0.25,) * channels, color=color)
    save_checkpoint(model, path, class_names=[f"class_{i}" for i in range(num_classes)], preprocessing=pre,
                    training={"dataset": "random-init", "note": "test fixture"})
    return path


@pytest.fixture(scope="session")
def gray_checkpoint(tmp_path_factory) -> Path:
    """resnet20 + CBAM, 10 classes, grayscale 32×32: like the demo model, random weights."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "gray.safetensors")


@pytest.fixture(scope="session")
def rgb_checkpoint(tmp_path_factory) -> Path:
    """resnet20 + BAM, 5 classes, RGB 32×32."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "rgb.safetensors", attention="bam", num_classes=5,
                           color="RGB")
