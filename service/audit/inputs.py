"""Inputs kept for review (``MACULA_AUDIT_INPUTS``): what the auditor sees the masks over.

``thumbnail`` (default): the decoded image as the model got it (EXIF orientation applied, the model's colour
mode), longest side at most 256 px, as JPEG; ``original``: the bytes the client sent, untouched; ``none``: no
image is kept (the record still has its sha256, size and dimensions).
"""

from __future__ import annotations

from io import BytesIO
from typing import Literal

from PIL import Image

from .interface import KeptInput

InputsMode = Literal["none", "thumbnail", "original"]
INPUT_MODES: tuple[str, ...] = ("none", "thumbnail", "original")
THUMBNAIL_SIDE = 256
THUMBNAIL_QUALITY = 85
_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"))


def thumbnail(image: Image.Image, *, side: int = THUMBNAIL_SIDE, quality: int = THUMBNAIL_QUALITY) -> KeptInput:
    """A JPEG of ``image`` (already decoded and EXIF-rotated) with its longest side at most ``side``; never
    enlarged, aspect ratio kept, ``image`` left as it is (no full-size copy). Greyscale stays greyscale; anything
    else becomes RGB. No metadata of the client's file is carried over."""
    width, height = image.size
    scale = min(1.0, side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    if small.mode not in ("L", "RGB"):
        small = small.convert("RGB")
    buf = BytesIO()
    small.save(buf, format="JPEG", quality=quality, optimize=False)
    return KeptInput("image/jpeg", buf.getvalue(), "thumbnail")


def media_type(data: bytes) -> str:
    """The media type of JPEG/PNG/WebP bytes from their magic numbers (the formats the service accepts)."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def keep_input(mode: str, image: Image.Image, data: bytes) -> KeptInput | None:
    """What ``mode`` keeps of one input: its decoded ``image`` and the ``data`` the client sent."""
    if mode == "thumbnail":
        return thumbnail(image)
    if mode == "original":
        return KeptInput(media_type(data), bytes(data), "original")
    if mode == "none":
        return None
    raise ValueError(f"unknown audit inputs mode {mode!r}; expected one of {', '.join(INPUT_MODES)}")
