"""Bytes → model input, and attention masks → PNG: what happens to an image outside the model.

Decoding runs in the bounded decode pool with PIL + numpy only (no torch ops, so no intra-op threads compete
with the inference thread) and stops at the model-sized uint8 pixels: 4× less to stack and copy than floats,
and the runner normalises a whole batch in one vectorised pass. Normalised (:func:`normalise`), the result
matches ``Preprocessing.eval_transform()`` (the training eval pipeline) up to PIL-vs-torchvision resize
rounding (≤ 1 grey level per pixel), with these deliberate, deterministic rules for inputs the training
pipeline never sees:

* EXIF orientation is applied first (``ImageOps.exif_transpose``); sizes reported are after it.
* Alpha is dropped (``convert`` semantics, as torchvision's ``v2.RGB`` / ``v2.Grayscale`` do); palette images
  with transparency go through RGBA first so the palette colour is kept.
* 16-bit greyscale (``I;16*``, ``I``) is scaled to 8 bits (v / 257, rounded) instead of Pillow's clipping.
* CMYK uses Pillow's CMYK → RGB conversion; ``1`` (bilevel) becomes 0/255.
* Animated WebP / APNG: the first frame.
* A JPEG more than 4× the size the model needs is decoded at reduced scale (``Image.draft``: libjpeg-turbo's DCT
  scaling by 1/2, 1/4 or 1/8), never below 2× that size, and the resize samples the region the original covers
  in the scaled decode (:func:`content_region`), not the scaled decode's rounded-up extent: so resampled, the
  result stays within a few grey levels of the full decode's (``bench/decode_cost.py`` measures it and the time
  saved; docs/benchmarks.md has the figures).

Each decoded image also carries ``input_box``: the region of the original (EXIF-rotated) image that the model's
input shows, computed by :func:`input_box` from the very resize and crop that :func:`to_pixels` applies (in the
original's pixels, also for a JPEG decoded at reduced scale). Attention masks cover that region and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models import Preprocessing

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
ALLOWED_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # Pillow's storage; else 4
STRIP_PIXELS = 1 << 20  # pixels per strip when narrowing 16-bit images
SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # == round(v / 257)
DRAFT_MARGIN = 2  # a JPEG decoded at reduced scale keeps at least this many times what the resize needs
DRAFT_MIN_LONG_SIDE = 256  # ... and at least this longest side, so that audit thumbnails (256 px) keep theirs


@dataclass(frozen=True)
class DecodedImage:
    """One image ready for the batcher: the model-sized pixels plus what the audit record needs."""

    pixels: np.ndarray  # uint8 (H, W, C), resized and cropped; the runner normalises
    width: int  # original size, after EXIF orientation
    height: int
    sha256: str
    nbytes: int
    input_box: tuple[int, int, int, int]  # what the model saw: [x0, y0, x1, y1) in original pixels (see input_box)
    kept: Any = None  # what the audit store keeps of the input (service.audit.inputs), if anything


def treat_bomb_warnings_as_errors() -> None:
    """Pillow's DecompressionBombWarning becomes an exception (→ 413) everywhere in this process."""
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def _other_format(data: bytes) -> str | None:
    """Image formats Pillow does not read but a client may well send: SVG, PDF, HEIF, JPEG XL (by signature)."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in head:
        return "SVG"
    if data.startswith(b"%PDF-"):
        return "PDF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return "HEIF"
    if data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    return None


def _sniffed_format(data: bytes) -> str | None:
    """The name of a known image format whose magic bytes match ``data``: Pillow's ``accept`` checks (no
    decoder runs), then the few formats Pillow cannot open at all."""
    Image.init()
    head = data[:64]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # noqa: BLE001, S112 - an accept() that chokes on the prefix just did not match
            continue
    return _other_format(data)


class ImageError(Exception):
    """Something is wrong with the bytes a client sent as an image (the message says what, for a human)."""


class EmptyImage(ImageError):
    pass


class UnsupportedFormat(ImageError):
    pass


class ImageTooLarge(ImageError):
    pass


class UndecodableImage(ImageError):
    pass


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Identify ``data`` (JPEG/PNG/WebP only) and check its pixel count from the header, before any decoding."""
    if not data:
        raise EmptyImage("empty image")
    try:
        img = Image.open(BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        fmt = _sniffed_format(data)
        if fmt is not None and fmt not in ALLOWED_FORMATS:  # a broken PNG is undecodable, not unsupported
            raise UnsupportedFormat(f"image format {fmt} is not accepted; send JPEG, PNG or WebP") from None
        raise UndecodableImage("not a recognisable image (expected JPEG, PNG or WebP)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any Pillow failure on a client's bytes is the client's problem
        raise UndecodableImage(f"cannot read image header: {type(exc).__name__}") from None
    if img.width * img.height > max_pixels:
        raise ImageTooLarge(f"image is {img.width}x{img.height} = {img.width * img.height} pixels; "
                            f"the limit is {max_pixels}")
    if img.width < 1 or img.height < 1:
        raise UndecodableImage("image has no pixels")
    return img


def _draft_for(img: Image.Image, pre: Preprocessing) -> float:
    """Ask the JPEG decoder for a DCT-scaled image no smaller than 2× what the resize needs; returns the scale
    (1, 1/2, 1/4 or 1/8) of the decoded image: its pixel x covers the original's [x / scale, (x + 1) / scale)."""
    if img.format != "JPEG":
        return 1.0
    needed = DRAFT_MARGIN * max(*pre.input_size, pre.resize_size if pre.resize_mode == "center_crop" else 0)
    scale = max(needed / min(img.size), DRAFT_MIN_LONG_SIDE / max(img.size))
    if scale >= 0.5:
        return 1.0
    width = img.width
    drafted = img.draft("L" if pre.color == "L" else "RGB",
                        (math.ceil(img.width * scale), math.ceil(img.height * scale)))
    return 1.0 if drafted is None else 1 / round(width / drafted[1][2])  # Pillow's box: the original's size, scaled


@dataclass
class Opened:
    """An image whose header was read (nothing decoded yet): its original size after EXIF orientation (known
    after decoding only for a PNG whose EXIF follows the pixels), and the bytes decoding it will hold at its peak."""

    img: Image.Image
    width: int
    height: int
    cost: int
    orientation_known: bool = True
    orientation: int = 1  # EXIF orientation (1 where unknown)
    scale: float = 1.0  # of the decoded image: a JPEG decoded at reduced scale is this times the original's size


def _header_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation if the header has it; None where reading it would decode the image (Pillow looks for
    a PNG's eXIf chunk after the pixel data by decoding them all)."""
    if img.format == "PNG" and "exif" not in img.info:
        return None
    return img.getexif().get(0x0112, 1)


def probe(data: bytes, *, max_pixels: int, pre: Preprocessing) -> Opened:
    """Open ``data`` (header only: nothing is decoded) and estimate the bytes decoding it will hold at its peak
    (after a JPEG draft, see :func:`_decode_cost`)."""
    img = open_image(data, max_pixels=max_pixels)
    try:
        orientation = _header_orientation(img)
        swaps = orientation in (5, 6, 7, 8)
        width, height = (img.height, img.width) if swaps else (img.width, img.height)
        scale = _draft_for(img, pre)
    except Exception as exc:  # noqa: BLE001
        raise UndecodableImage(f"cannot read image header: {type(exc).__name__}") from None
    cost = _decode_cost(img, pre.color, rotates=orientation in range(2, 9))
    return Opened(img, width, height, cost, orientation_known=orientation is not None, orientation=orientation or 1,
                  scale=scale)


def _decode_cost(img: Image.Image, color: str, *, rotates: bool) -> int:
    """Peak bytes of decoding ``img``: Pillow's decoded image, a rotated copy when EXIF asks for one, the 8-bit
    image a 16-bit one is narrowed to (with one strip), the converted image when the mode is not ``color``."""
    pixels, decoded = img.width * img.height, BYTES_PER_PIXEL.get(img.mode, 4)
    cost = pixels * decoded * (2 if rotates else 1)
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        cost, mode = cost + pixels + STRIP_PIXELS * 8, "L"
    if mode != color:
        cost += pixels * (1 if color == "L" else 4)
    return cost


def _sixteen_to_eight_bits(img: Image.Image) -> Image.Image:
    """16/32-bit greyscale → 8 bits as round(v / 257) clipped to 0..255, through a lookup table a strip of rows at
    a time, so no full-size wide copy is ever made (a 39 MP 16-bit image holds 78 MB; one float64 copy of it would
    be 312 MB)."""
    out = np.empty((img.height, img.width), np.uint8)
    rows = max(1, STRIP_PIXELS // img.width)
    for top in range(0, img.height, rows):
        strip = np.asarray(img.crop((0, top, img.width, min(top + rows, img.height))))
        if strip.dtype != np.uint16:  # mode I: 32-bit; anything above 65535 maps to 255 anyway
            strip = np.clip(strip, 0, 65535).astype(np.uint16)
        out[top:top + rows] = SIXTEEN_TO_EIGHT[strip]
    return Image.fromarray(out, mode="L")


def canonical_mode(img: Image.Image, color: str) -> Image.Image:
    """Any decoded mode → ``color`` ("RGB" or "L") by the rules in the module docstring."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = _sixteen_to_eight_bits(img)
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    return img if img.mode == color else img.convert(color)


def decode_opened(opened: Opened, pre: Preprocessing) -> Image.Image:
    """Decode an image :func:`probe` opened, to ``pre.color``, EXIF orientation applied."""
    try:
        img = opened.img
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # without in_place it returns a full-size copy, always
        return canonical_mode(img, pre.color)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise UndecodableImage(f"cannot decode image: {type(exc).__name__}: {str(exc)[:100]}") from None


def decode(data: bytes, *, max_pixels: int, pre: Preprocessing) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to a PIL image in ``pre.color``; returns it and the original (w, h) after EXIF orientation."""
    opened = probe(data, max_pixels=max_pixels, pre=pre)
    img = decode_opened(opened, pre)
    return img, (opened.width, opened.height) if opened.orientation_known else img.size


PADDED_AT_START = {2: (True, False), 3: (True, True), 4: (False, True), 6: (True, False), 7: (True, True),
                   8: (False, True)}  # EXIF orientation → whether x, y now start with what was the stored end


def content_region(size: tuple[int, int], original: tuple[int, int], scale: float,
                   orientation: int = 1) -> tuple[float, float, float, float]:
    """Where the original image lies in its decode of ``size`` (w, h) at ``scale``, both after EXIF orientation.

    A JPEG decoded at reduced scale spans ``original`` × ``scale`` decoded pixels (its pixel x covers the
    original's [x / scale, (x + 1) / scale)), rounded up to whole pixels at the end of the stored rows and
    columns; orientation may move that end to the start. Resampling this region, not the decoded image's whole
    extent, keeps the geometry of the full decode (the rounded-up extent would stretch the image by up to one scaled
    pixel, which moves its sharp edges by many grey levels).
    """
    (width, height), extent_w, extent_h = size, original[0] * scale, original[1] * scale
    x_first, y_first = PADDED_AT_START.get(orientation, (False, False))
    x0, y0 = (width - extent_w if x_first else 0.0), (height - extent_h if y_first else 0.0)
    return x0, y0, x0 + extent_w, y0 + extent_h


def _resize_size(w: int, h: int, pre: Preprocessing) -> tuple[int, int]:
    """(width, height) after the resize step, torchvision's rule (shorter side → resize_size, long truncated)."""
    if pre.resize_mode == "stretch":
        return pre.input_size[1], pre.input_size[0]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(pre.resize_size * long / short)
    return (pre.resize_size, new_long) if w <= h else (new_long, pre.resize_size)


def _half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _crop_start(size: int, out: int) -> int:
    """Where torchvision's CenterCrop starts along one axis of ``size`` pixels: round((size - out) / 2), or, when
    the crop is larger, minus the zero padding it adds before that side ((out - size) // 2)."""
    return -((out - size) // 2) if out > size else int(round((size - out) / 2.0))


def input_box(size: tuple[int, int], pre: Preprocessing) -> tuple[int, int, int, int]:
    """The region of the original image that the model's input shows: ``(x0, y0, x1, y1)`` in original pixels,
    x1/y1 exclusive (``[x0:x1]`` slices it), each edge rounded to the nearest whole pixel (halves up).

    ``size`` is the original's (w, h) after EXIF orientation; a JPEG decoded at reduced scale is resampled as its
    full decode would be (:func:`to_pixels`), so its box is the same. Follows the resize and centre crop exactly
    (crop offsets in resized pixels, mapped back by the resize's scale); "stretch" shows the whole image. Where
    the crop is larger than the resized image (zero padding) the box is the image's whole extent along that axis.
    """
    width, height = size
    (rw, rh), (out_h, out_w) = _resize_size(width, height, pre), pre.input_size
    left, top = (0, 0) if pre.resize_mode == "stretch" else (_crop_start(rw, out_w), _crop_start(rh, out_h))
    right, bottom = (rw, rh) if pre.resize_mode == "stretch" else (left + out_w, top + out_h)

    def edge(v: int, resized: int, full: int) -> int:
        return min(_half_up(min(max(v, 0), resized) * full / resized), full)

    return edge(left, rw, width), edge(top, rh, height), edge(right, rw, width), edge(bottom, rh, height)


def _center_crop(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torchvision's CenterCrop on an (H, W[, C]) array: zero-pad when too small, then crop round((H - h) / 2)."""
    h, w = arr.shape[:2]
    if out_h > h or out_w > w:
        pad_h, pad_w = max(out_h - h, 0), max(out_w - w, 0)
        pads = [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)] + [(0, 0)] * (arr.ndim - 2)
        arr = np.pad(arr, pads)
        h, w = arr.shape[:2]
    top, left = _crop_start(h, out_h), _crop_start(w, out_w)
    return arr[top:top + out_h, left:left + out_w]


def _source_box(region: tuple[float, float, float, float], resized: tuple[int, int],
                pre: Preprocessing) -> tuple[float, float, float, float] | None:
    """The part of ``region`` (the original image, in decoded pixels) that resize-then-center-crop keeps, for a
    downscale that needs no padding (else None); "stretch" keeps all of it.

    Resizing only that part (``Image.resize(box=...)``) samples the same source points as resizing the whole
    image and cropping, for ~1/3 less work on a 4:5 photo (measured equal to the full path: max 1 grey level).
    """
    if pre.resize_mode == "stretch":
        return region
    x0, y0, x1, y1 = region
    (rw, rh), (ch, cw) = resized, pre.input_size
    if cw > rw or ch > rh or rw > x1 - x0 or rh > y1 - y0:
        return None  # padding, or an upscale (cheap anyway; there the box path can differ by 2 grey levels)
    top, left = _crop_start(rh, ch), _crop_start(rw, cw)
    sx, sy = (x1 - x0) / rw, (y1 - y0) / rh
    return x0 + left * sx, y0 + top * sy, x0 + (left + cw) * sx, y0 + (top + ch) * sy


def to_pixels(img: Image.Image, pre: Preprocessing, *, original: tuple[int, int] | None = None,
              region: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """PIL image in ``pre.color`` → the model's uint8 (H, W, C) pixels: resize + center crop, still in 8 bits.

    ``original`` is the (w, h) the resize rule is computed from and ``region`` where that image lies in ``img``
    (both default to ``img`` itself): a JPEG decoded at reduced scale is resampled exactly as its full decode
    would be (see :func:`content_region`). Normalising to float is left to the model runner, which does it for a
    whole batch at once.
    """
    whole = (0, 0, img.width, img.height)
    region = region or whole
    resized = _resize_size(*(original or img.size), pre)
    box = _source_box(region, resized, pre)
    if box is not None:
        arr = np.asarray(img.resize((pre.input_size[1], pre.input_size[0]), Image.Resampling.BILINEAR, box=box))
    else:
        same = resized == img.size and region == whole
        arr = _center_crop(np.asarray(img if same else img.resize(resized, Image.Resampling.BILINEAR, box=region)),
                           *pre.input_size)
    return np.ascontiguousarray(arr[:, :, None] if arr.ndim == 2 else arr)


def normalise(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 (H, W, C) → float32 (C, H, W), ``(x / 255 - mean) / std``: the reference for one image (the runner
    does the same to a batch in torch)."""
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(((pixels.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))


def preprocess(data: bytes, *, max_pixels: int, pre: Preprocessing) -> DecodedImage:
    """The whole client-bytes → model-pixels path in one call (the service runs :func:`probe` and
    :func:`finish` as two steps, so that it can budget the memory in between)."""
    return finish(probe(data, max_pixels=max_pixels, pre=pre), data, pre)


def finish(opened: Opened, data: bytes, pre: Preprocessing,
           keep: Callable[[Image.Image, bytes], Any] | None = None) -> DecodedImage:
    """Decode an image :func:`probe` opened and make the model's pixels from it; ``keep(decoded, data)``, if given,
    makes what the audit store keeps of the input (a thumbnail of the decoded, EXIF-rotated image)."""
    img = decode_opened(opened, pre)
    original = (opened.width, opened.height) if opened.orientation_known else img.size  # PNG: never scaled
    region = content_region(img.size, original, opened.scale, opened.orientation)
    pixels = to_pixels(img, pre, original=original, region=region)
    kept = None if keep is None else keep(img, data)
    return DecodedImage(pixels, *original, hashlib.sha256(data).hexdigest(), len(data), input_box(original, pre),
                        kept)


def png_base64(mask: np.ndarray, compress_level: int = 6) -> str:
    """uint8 (H, W) → base64 of an 8-bit greyscale PNG (zlib ``compress_level``, 0-9)."""
    buf = BytesIO()
    Image.fromarray(np.ascontiguousarray(mask), mode="L").save(buf, format="PNG", compress_level=compress_level)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def scaled_box(box: Sequence[float], original: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` (original pixels) in the pixels of a ``canvas`` (w, h) copy of the original: edges scaled, rounded
    (halves up) and clipped to the canvas, never empty. The service's original-size masks and the overlays
    (service/overlay.py; the auditor's page does the same in overlay.js) all place a mask with it."""
    (width, height), (sx, sy) = canvas, (canvas[0] / original[0], canvas[1] / original[1])
    x0, y0 = min(max(_half_up(box[0] * sx), 0), width - 1), min(max(_half_up(box[1] * sy), 0), height - 1)
    x1, y1 = min(max(_half_up(box[2] * sx), x0 + 1), width), min(max(_half_up(box[3] * sy), y0 + 1), height)
    return x0, y0, x1, y1


def place_mask(mask: np.ndarray, box: tuple[int, int, int, int], original: tuple[int, int],
               canvas: tuple[int, int]) -> np.ndarray:
    """A uint8 (h, w) mask over a ``canvas`` (w, h) copy of the original image: resized (bilinear) into
    ``box`` (the model's view, original pixels, scaled to the canvas), 0 everywhere else."""
    x0, y0, x1, y1 = scaled_box(box, original, canvas)
    out = np.zeros((canvas[1], canvas[0]), np.uint8)
    resized = Image.fromarray(mask, mode="L").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    out[y0:y1, x0:x1] = np.asarray(resized)
    return out
