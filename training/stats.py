"""Facts about a dataset: per-channel mean/std of its images (``--mean/--std auto``) and images per class.

The mean and standard deviation are those of the pixels the model sees: every image goes through the
checkpoint's evaluation geometry (resize, crop, colour) without normalisation, and the statistics are
taken over all pixels of up to :data:`MAX_STATS_IMAGES` images spread evenly over the split, summed
in float64.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from models.checkpoint import Preprocessing

from .errors import DatasetError

MAX_STATS_IMAGES = 2000


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of ``dataset`` (through any Subset wrappers) that applies ``transform`` instead."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    clone = copy.copy(dataset)
    clone.transform = transform
    return clone


def evenly_spread(dataset: Dataset, n: int) -> Dataset:
    if n >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist())


Stats = tuple[tuple[float, ...], tuple[float, ...], int]


def channel_stats(dataset: Dataset, preprocessing: Preprocessing, *, workers: int = 0,
                  max_images: int = MAX_STATS_IMAGES, need_std: bool = True) -> Stats:
    """``(mean, std, images used)`` per channel, in [0, 1] pixel units, of ``dataset`` as the model sees it.

    With ``need_std``, a channel without variation (std 0: nothing to divide by) is an error.
    """
    channels = len(preprocessing.mean)
    raw = replace(preprocessing, mean=(0.0,) * channels, std=(1.0,) * channels).eval_transform()
    sample = evenly_spread(with_transform(dataset, raw), max_images)
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    pixels = 0
    for images, *_ in DataLoader(sample, batch_size=64, num_workers=workers):
        images = images.double()
        total += images.sum((0, 2, 3))
        squares += (images * images).sum((0, 2, 3))
        pixels += images.shape[0] * images.shape[2] * images.shape[3]
    if pixels == 0:
        raise DatasetError("--mean/--std auto: the training split has no images")
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp(min=0).sqrt()
    if need_std and bool((std < 1e-6).any()):
        raise DatasetError(f"--std auto: the training images are flat in some channel (std {std.tolist()}); "
                           f"give --std numbers instead")
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist()), len(sample)


def labels_of(dataset: Dataset) -> np.ndarray | None:
    """Every sample's label without loading an image (``targets`` / ``labels``), or None if unknown."""
    if isinstance(dataset, Subset):
        labels = labels_of(dataset.dataset)
        return None if labels is None else labels[np.asarray(dataset.indices, dtype=np.int64)]
    for attribute in ("targets", "labels"):
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute), dtype=np.int64)
    return None


def class_counts(dataset: Dataset, num_classes: int) -> list[int] | None:
    labels = labels_of(dataset)
    return None if labels is None else np.bincount(labels, minlength=num_classes).tolist()
