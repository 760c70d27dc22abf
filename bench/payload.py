"""What every benchmarked server receives: one real JPEG, and the same random-weight Macula checkpoint.

Both are written at bench time (never committed): the JPEG from a scikit-image photo, the checkpoint with
``models.save_checkpoint`` so that every server loads the very same weights through ``models.load_checkpoint``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from models import Preprocessing, create_model, save_checkpoint

JPEG_SIZE = (500, 400)  # width, height: a typical phone-upload thumbnail, as the issue asks


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: architecture, attention, classes and input rule."""

    key: str
    arch: str
    attention: str | None
    num_classes: int
    preprocessing: Preprocessing

    def build(self, seed: int = 0) -> torch.nn.Module:
        """The network with random weights drawn from ``seed``."""
        torch.manual_seed(seed)
        return create_model(self.arch, attention=self.attention, num_classes=self.num_classes)

    def random_batch(self, batch_size: int) -> torch.Tensor:
        """A random channels_last input batch of the model's size (forward cost does not depend on the values)."""
        channels = 3 if self.preprocessing.color == "RGB" else 1
        x = torch.randn(batch_size, channels, *self.preprocessing.input_size)
        return x.to(memory_format=torch.channels_last)


IMAGENET_224 = Preprocessing(input_size=(224, 224), resize_mode="center_crop", resize_size=256)
BENCH_MODELS = {
    "resnet18": BenchModel("resnet18", "resnet18", "cbam", 1000, IMAGENET_224),
    "resnet50": BenchModel("resnet50", "resnet50", "cbam", 1000, IMAGENET_224),
    # tiny configuration for the CI smoke test: a CIFAR-sized CBAM-ResNet20 at 32x32
    "resnet20": BenchModel("resnet20", "resnet20", "cbam", 10,
                           Preprocessing(input_size=(32, 32), resize_mode="stretch", resize_size=32)),
}


def jpeg_bytes(size: tuple[int, int] = JPEG_SIZE, quality: int = 90) -> bytes:
    """scikit-image's ``chelsea`` photo (a cat), resized to ``size`` and encoded as a baseline JPEG."""
    from PIL import Image
    from skimage.data import chelsea

    image = Image.fromarray(chelsea()).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes())
    return path


def class_names(num_classes: int) -> list[str]:
    """ImageNet labels (shipped inside torchvision, no download) for 1000 classes, else ``class_i``."""
    if num_classes == 1000:
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        return list(_IMAGENET_CATEGORIES)
    return [f"class_{i}" for i in range(num_classes)]


def write_checkpoint(spec: BenchModel, path: Path, seed: int = 0) -> Path:
    """Random weights (seeded), saved as a Macula checkpoint; every server loads this one file."""
    save_checkpoint(spec.build(seed), path, class_names=class_names(spec.num_classes), preprocessing=spec.preprocessing,
                    training={"dataset": "random-init", "note": "benchmark model, random weights"})
    return path
