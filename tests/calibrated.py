"""A tiny trained and calibrated model: squares vs rings on black, 24×24 greyscale (seconds on one CPU core).

Used by the calibration tests and the service's familiarity tests: an image drawn like its training images
must come out familiar, noise must not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from models import Preprocessing, create_model, save_checkpoint
from training.calibration import calibrate

SIZE = 24
MEAN, STD = 0.1, 0.25
PREPROCESSING = Preprocessing(input_size=(SIZE, SIZE), resize_mode="stretch", resize_size=SIZE, mean=(MEAN,),
                              std=(STD,), color="L")


def shapes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images (n, SIZE, SIZE): class 0 a filled square, class 1 a ring, at random spots and sizes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images = torch.zeros(n, SIZE, SIZE, dtype=torch.uint8)
    for i in range(n):
        r = int(torch.randint(3, 7, (1,), generator=g))
        cy, cx = (int(v) for v in torch.randint(r + 1, SIZE - r - 1, (2,), generator=g))
        brightness = int(torch.randint(160, 256, (1,), generator=g))
        if labels[i] == 0:
            inside = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        else:
            d = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
            inside = (d <= r) & (d >= r - 1.5)
        images[i][inside] = brightness
    return images, labels


def normalise(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() / 255 - MEAN) / STD)[:, None]


def make_calibrated_checkpoint(path: Path, *, steps: int = 20) -> Path:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=2, in_chans=1, attention="cbam", init="official")
    images, labels = shapes(512, seed=1)
    x = normalise(images)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        batch = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    val_images, val_labels = shapes(200, seed=2)
    calibration = calibrate(model, TensorDataset(x, labels), TensorDataset(normalise(val_images), val_labels),
                            transform=None, num_classes=2)
    save_checkpoint(model, path, class_names=["square", "ring"], preprocessing=PREPROCESSING,
                    training={"dataset": "squares-and-rings"}, calibration=calibration)
    return path
