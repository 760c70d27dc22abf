"""Object boxes for a folder of images, so the localisation score works on users' own data.

A boxes file is CSV with a header ``image,x0,y0,x1,y1``: ``image`` is the path relative to the folder
being scored (``cat/001.jpg``), the coordinates are pixels of the upright (EXIF-rotated) original
image, ``x1``/``y1`` exclusive, one box per image. Each box is carried into the model's input the way
the image is (:func:`input_box`: resize, then centre crop for ``center_crop``; a plain resize for
``stretch``), clipped to the input and rounded to whole pixels; a box that falls outside the crop
entirely is left out and counted.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from models.checkpoint import Preprocessing

from .errors import DatasetError

Box = tuple[float, float, float, float]
COLUMNS = ("image", "x0", "y0", "x1", "y1")


def read_boxes(path: str | Path) -> dict[str, Box]:
    """``{relative image path: (x0, y0, x1, y1)}`` from a boxes CSV file; clear errors for bad rows."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such boxes file")
    boxes: dict[str, Box] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise DatasetError(f"{path}: the header must be {','.join(COLUMNS)}, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                box = tuple(float(row[k]) for k in COLUMNS[1:])
            except (TypeError, ValueError):
                raise DatasetError(f"{path}:{line}: coordinates must be numbers: {row}") from None
            if not (box[0] < box[2] and box[1] < box[3]):
                raise DatasetError(f"{path}:{line}: need x0 < x1 and y0 < y1, got {box}")
            name = Path(row["image"]).as_posix()
            if name in boxes:
                raise DatasetError(f"{path}:{line}: a second box for {name} (one box per image)")
            boxes[name] = box
    return boxes


def upright_size(path: str) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, from the file's header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return (height, width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from exc


def input_box(box: Box, size: tuple[int, int], pre: Preprocessing) -> tuple[int, int, int, int] | None:
    """``box`` on an upright image of ``size`` (w, h), in the model input's pixels; None if outside it.

    Follows torchvision's ``Resize(int)`` (shorter side to ``resize_size``, the longer one truncated)
    and ``CenterCrop`` (offsets rounded), which ``Preprocessing.eval_transform`` uses.
    """
    width, height = size
    out_h, out_w = pre.input_size
    if pre.resize_mode == "stretch":
        scale_x, scale_y, left, top = out_w / width, out_h / height, 0, 0
    else:
        short, long = min(width, height), max(width, height)
        new_long = int(pre.resize_size * long / short)
        new_w, new_h = (pre.resize_size, new_long) if width <= height else (new_long, pre.resize_size)
        scale_x, scale_y = new_w / width, new_h / height
        left, top = int(round((new_w - out_w) / 2.0)), int(round((new_h - out_h) / 2.0))
    x0, x1 = (min(max(round(v * scale_x - left), 0), out_w) for v in (box[0], box[2]))
    y0, y1 = (min(max(round(v * scale_y - top), 0), out_h) for v in (box[1], box[3]))
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


class BoxedImages(Dataset):
    """``(image, label, box)`` for the images of ``folder`` (at ``indices``) that have a box inside the input."""

    def __init__(self, folder: ImageFolder, indices: list[int], boxes: dict[str, Box], pre: Preprocessing) -> None:
        self.folder, self.items = folder, []
        self.outside = 0
        root = Path(folder.root)
        for index in indices:
            path = folder.samples[index][0]
            box = boxes.get(Path(path).relative_to(root).as_posix())
            if box is None:
                continue
            mapped = input_box(box, upright_size(path), pre)
            if mapped is None:
                self.outside += 1
            else:
                self.items.append((index, mapped))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        index, box = self.items[i]
        image, label = self.folder[index]
        return image, label, torch.tensor(box)
