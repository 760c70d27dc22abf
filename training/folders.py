"""Users' own image folders: ``imagefolder:PATH`` for training, and any one split of a folder for evaluation.

Training reads ``PATH/train`` and ``PATH/val`` (and ``PATH/test`` when it exists), one sub-folder per
class; the class names are the folder names, sorted. Evaluation needs no ``train/``: it scores
``PATH/test``, ``PATH/val`` or a flat folder of class folders, labelled by the checkpoint's own class
list (a folder may hold only some of the classes). Images are EXIF-rotated as they are loaded, as
the service does with uploads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from .errors import DatasetError

SPLITS = ("train", "val", "test")


def load_image(path: str) -> Image.Image:
    """Open an image fully, upright by its EXIF orientation; an unreadable file becomes a DatasetError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image) or image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from exc


def class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class KnownClassFolder(ImageFolder):
    """An ImageFolder labelled by a fixed class list; its folder may hold any subset of those classes."""

    def __init__(self, root: str, class_names: list[str], **kwargs) -> None:
        self.known = list(class_names)
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = class_dirs(Path(directory))
        unknown = sorted(set(present) - set(self.known))
        if unknown:
            raise DatasetError(f"{directory}: folder(s) {', '.join(unknown)} are not classes of the model "
                               f"({', '.join(self.known[:20])}{' ...' if len(self.known) > 20 else ''})")
        return self.known, {name: i for i, name in enumerate(self.known) if name in present}


def image_folder(root: Path, transform: Callable, class_names: list[str] | None = None) -> ImageFolder:
    """``root/<class>/*`` as an ImageFolder; clear errors for a missing folder, empty classes, no images."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (imagefolder:PATH needs PATH/train and PATH/val, "
                           f"one sub-folder per class)")
    empty = sorted(p.name for p in root.iterdir() if p.is_dir() and not any(q.is_file() for q in p.rglob("*")))
    if empty:
        raise DatasetError(f"{root}: class folder(s) without images: {', '.join(empty)}")
    try:
        if class_names is None:
            return ImageFolder(str(root), transform=transform, loader=load_image)
        return KnownClassFolder(str(root), class_names, transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"{root}: {exc}") from exc


def same_classes(root: Path, train: ImageFolder, other: ImageFolder, split: str) -> None:
    if train.classes != other.classes:
        raise DatasetError(f"{root}: train classes {train.classes} differ from {split} classes {other.classes}")


def evaluation_folder(path: str, split: str | None, class_names: list[str], transform: Callable
                      ) -> tuple[str, ImageFolder]:
    """The folder to score and its name: ``PATH/<split>``; by default ``test``, else ``val``, else PATH itself.

    PATH itself is used when it is a flat folder of class folders (no ``train``/``val``/``test`` inside);
    its split is called ``all``. A split that is asked for and missing is refused, naming what is there.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if split is not None:
        if split not in present:
            there = f"it has {', '.join(f'{s}/' for s in present)}" if present else \
                "it is a flat folder of class folders, scored whole when --split is left out"
            raise DatasetError(f"{root}: no {split}/ folder to score ({there})")
        return split, image_folder(root / split, transform, class_names)
    for candidate in ("test", "val"):
        if candidate in present:
            return candidate, image_folder(root / candidate, transform, class_names)
    if present:
        raise DatasetError(f"{root}: no val/ or test/ folder; pass --split train to score the training images")
    return "all", image_folder(root, transform, class_names)
