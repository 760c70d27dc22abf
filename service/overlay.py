"""Attention masks drawn over the image the model saw: the renderer behind
``GET /v1/predictions/{id}/overlay.png`` and the colour tables that the auditor's page (``/audit/``) uses.

Geometry: a mask covers ``input_box`` — the region of the original (EXIF-rotated) image that the model saw,
``[x0, y0, x1, y1]`` in original pixels — or the whole image when a record has no box. The image drawn on may
be a smaller copy of the original (the audit store keeps a thumbnail), so the box is scaled by the ratio of the
two sizes (``service.codec.scaled_box``, as the service's own original-size masks are). Outside the box the model
saw nothing: the image's pixels are left as they are.

Inside the box: the mask is resized (bilinear) to the box, turned into colours through a 256-entry table made
once from one of matplotlib's colour maps (matplotlib is already a dependency, for training plots), and blended
with the image: ``out = (1 - alpha) × image + alpha × colour(mask)``. ``stretch`` maps the mask's own
min..max onto 0..255 first: masks often sit near 1 (a last-stage mask on a photo averaged 252/255), where
every colour would look the same. Nothing here knows about HTTP; bad arguments raise :class:`OverlayError`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from functools import lru_cache
from io import BytesIO
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .codec import scaled_box

COLORMAPS = ("turbo", "viridis", "inferno", "gray")
DEFAULT_COLORMAP = "turbo"


class OverlayError(ValueError):
    """An overlay that cannot be drawn from what was asked (bad box, alpha, colour map...)."""


class MaskNotFound(OverlayError):
    """The record has no such mask: no such image, no masks kept, no such module, or a mask it cannot read."""


@lru_cache(maxsize=len(COLORMAPS))
def colormap_table(name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """uint8 (256, 3): the RGB colour of each mask value 0..255 in matplotlib's colour map ``name``."""
    if name not in COLORMAPS:
        raise OverlayError(f"unknown colour map {name!r}; one of {', '.join(COLORMAPS)}")
    from matplotlib import colormaps  # imported on first use: only overlays need it

    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    table = np.round(rgba[:, :3] * 255.0).astype(np.uint8)
    table.setflags(write=False)
    return table


def stretch_contrast(mask: np.ndarray) -> np.ndarray:
    """The mask's min..max mapped onto 0..255 (rounded); a constant mask is returned unchanged."""
    low, high = int(mask.min()), int(mask.max())
    if high == low:
        return mask
    scaled = (mask.astype(np.float32) - low) * (255.0 / (high - low))
    return np.round(scaled).astype(np.uint8)


def box_in_image(input_box: Sequence[float] | None, original_size: tuple[int, int] | None,
                 image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``input_box`` (original pixels) → integer ``(x0, y0, x1, y1)`` in the pixels of the image drawn on.

    ``original_size`` is (width, height) of the image the box refers to (None: the image drawn on itself);
    no box means the whole image. The result is clipped to the image and never empty.
    """
    width, height = image_size
    if input_box is None:
        return 0, 0, width, height
    if len(input_box) != 4:
        raise OverlayError(f"input_box must be [x0, y0, x1, y1], got {list(input_box)!r}")
    ow, oh = original_size or image_size
    if ow <= 0 or oh <= 0:
        raise OverlayError(f"original size must be positive, got {ow}x{oh}")
    x0, y0, x1, y1 = (float(v) for v in input_box)
    if not (x1 > x0 and y1 > y0):
        raise OverlayError(f"input_box must have x1 > x0 and y1 > y0, got {list(input_box)!r}")
    return scaled_box((x0, y0, x1, y1), (ow, oh), (width, height))  # the service's own masks' geometry


def render_overlay(image: Image.Image, mask: np.ndarray, *, input_box: Sequence[float] | None = None,
                   original_size: tuple[int, int] | None = None, alpha: float = 0.5,
                   colormap: str = DEFAULT_COLORMAP, stretch: bool = False) -> Image.Image:
    """An RGB image of ``image``'s size: ``mask`` (uint8, (h, w)) in colour over the box, the image elsewhere."""
    if not 0.0 <= alpha <= 1.0:
        raise OverlayError(f"alpha must be between 0 and 1, got {alpha}")
    if mask.ndim != 2 or mask.dtype != np.uint8 or mask.size == 0:
        raise OverlayError(f"a mask is a non-empty uint8 (h, w) array, got {mask.dtype} {mask.shape}")
    table = colormap_table(colormap)
    base = image.convert("RGB")
    x0, y0, x1, y1 = box_in_image(input_box, original_size, base.size)
    values = stretch_contrast(mask) if stretch else mask
    resized = np.asarray(Image.fromarray(values, mode="L").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
    pixels = np.array(base, dtype=np.float32)
    region = pixels[y0:y1, x0:x1]
    pixels[y0:y1, x0:x1] = (1.0 - alpha) * region + alpha * table[resized].astype(np.float32)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="RGB")


def overlay_png(image: Image.Image, mask: np.ndarray, *, text: Mapping[str, str] | None = None,
                **options: Any) -> bytes:
    """:func:`render_overlay` as PNG bytes; ``text`` goes into the file as tEXt chunks (module, prediction id)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = BytesIO()
    render_overlay(image, mask, **options).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class StoredMask(NamedTuple):
    """One module's mask of one image of an audit record, with that image's entry (sizes, ``input_box``)."""

    module: str
    mask: np.ndarray
    entry: Mapping[str, Any]


def record_mask(record: Mapping[str, Any], image: int, module: str | None) -> StoredMask:
    """Module ``module``'s mask (``None``: the last, deepest module) for image ``image`` of an audit record."""
    images = record.get("images") or []
    if not 0 <= image < len(images):
        raise MaskNotFound(f"image must be between 0 and {len(images) - 1}, got {image}")
    entry = images[image]
    entries = entry.get("attention") or []
    if not entries:
        raise MaskNotFound(f"prediction {record.get('id')} kept no attention masks (predict with attention=true)")
    module = entries[-1].get("module") if module is None else module
    found = next((e for e in entries if e.get("module") == module), None)
    if found is None:
        names = ", ".join(e.get("module", "?") for e in entries)
        raise MaskNotFound(f"no attention module {module!r} in this prediction; modules: {names}")
    try:
        with Image.open(BytesIO(base64.b64decode(found["png"], validate=True))) as png:
            mask = np.asarray(png.convert("L"))
    except (KeyError, binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise MaskNotFound(f"the stored mask of module {module!r} is not a readable PNG") from exc
    return StoredMask(module, mask, entry)


def open_kept_input(data: bytes) -> Image.Image:
    """A kept input's bytes (a thumbnail, or what the client sent) as an image the right way up."""
    try:
        with Image.open(BytesIO(data)) as img:
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise OverlayError("the kept input image cannot be read") from exc


def record_overlay_png(record: Mapping[str, Any], kept_input: Image.Image, *, image: int, module: str | None,
                       alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP, stretch: bool = False) -> bytes:
    """The overlay of one module (``None``: the last) of one image of an audit record over that image's kept
    input, as PNG bytes."""
    stored = record_mask(record, image, module)
    width, height = stored.entry.get("width"), stored.entry.get("height")
    original = (int(width), int(height)) if width and height else None
    text = {"prediction": str(record.get("id", "")), "image": str(image), "module": stored.module,
            "colormap": colormap, "alpha": f"{alpha:g}"}
    return overlay_png(kept_input, stored.mask, text=text, input_box=stored.entry.get("input_box"),
                       original_size=original, alpha=alpha, colormap=colormap, stretch=stretch)
