"""JPEGs decoded at reduced scale (libjpeg-turbo's DCT scaling through Pillow's draft): the model's input stays
within a few grey levels of the full decode's whatever the size, EXIF orientation or colour space, the box the
model saw is the full decode's, and the pixel limit and memory estimate hold before anything is decoded."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data

from models import Preprocessing
from service.codec import (
    ImageTooLarge,
    canonical_mode,
    content_region,
    decode_opened,
    input_box,
    preprocess,
    probe,
    to_pixels,
)

IMAGENET = Preprocessing(input_size=(224, 224), resize_mode="center_crop", resize_size=256)
GREY_48 = Preprocessing(input_size=(48, 48), resize_mode="stretch", resize_size=48, mean=(0.5,), std=(0.25,),
                        color="L")
LIMIT = 40_000_000
# Against the full decode, in grey levels of the uint8 input: DCT scaling filters a little differently from the
# antialiased bilinear resize alone (bench/decode_cost.py measures it on the same photos).
MAX_LEVELS, MEAN_LEVELS = 12, 0.6


def jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kwargs.pop("quality", 90), **kwargs)
    return buf.getvalue()


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).resize(size, Image.Resampling.BICUBIC)


def full_decode(blob: bytes, pre: Preprocessing) -> np.ndarray:
    """The reference: every pixel decoded, EXIF-rotated, converted, then the codec's own resize and crop."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(blob)))
    return to_pixels(canonical_mode(img, pre.color), pre)


def assert_close(blob: bytes, pre: Preprocessing) -> None:
    opened = probe(blob, max_pixels=LIMIT, pre=pre)
    assert opened.scale < 1, "this image should be decoded at reduced scale"
    diff = np.abs(preprocess(blob, max_pixels=LIMIT, pre=pre).pixels.astype(int) - full_decode(blob, pre))
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (diff.max(), diff.mean())


@pytest.mark.parametrize("pre", [IMAGENET, GREY_48], ids=["224-rgb", "48-grey"])
@pytest.mark.parametrize(("name", "size"), [("astronaut", (2048, 2048)), ("coffee", (2001, 1335)),
                                            ("retina", (1411, 1411)), ("chelsea", (3001, 1997))])
def test_a_scaled_decode_stays_close_to_the_full_decode_on_real_photos(name, size, pre):
    assert_close(jpeg(photo(name, size)), pre)  # odd sizes: the scaled decode ends in a part-padded pixel


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_scaled_decode_follows_every_exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    blob = jpeg(photo("coffee", (2001, 1335)), exif=exif.tobytes())  # padding moves to the start in 2, 3, 4, 6, 7, 8
    assert_close(blob, IMAGENET)
    decoded = preprocess(blob, max_pixels=LIMIT, pre=IMAGENET)
    oriented = (1335, 2001) if orientation in (5, 6, 7, 8) else (2001, 1335)
    assert (decoded.width, decoded.height) == oriented
    assert decoded.input_box == input_box(oriented, IMAGENET)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_content_region_is_where_pillows_transpose_puts_the_original(orientation):
    stored = np.full((5, 7), 255, np.uint8)  # a 6.5 × 4.5 original decoded into 7 × 5 pixels: last row/column padded
    stored[-1, :], stored[:, -1] = 0, 0
    img = Image.fromarray(stored)
    img.getexif()[0x0112] = orientation
    shown = np.asarray(ImageOps.exif_transpose(img))
    original = (9, 13) if orientation in (5, 6, 7, 8) else (13, 9)
    x0, y0, x1, y1 = content_region(shown.shape[::-1], original, 0.5, orientation)
    assert (x1 - x0, y1 - y0) == (original[0] / 2, original[1] / 2)
    assert (x0 > 0, x1 < shown.shape[1]) == (shown[:, 0].max() == 0, shown[:, -1].max() == 0)
    assert (y0 > 0, y1 < shown.shape[0]) == (shown[0].max() == 0, shown[-1].max() == 0)


@pytest.mark.parametrize("kind", ["grey", "cmyk", "progressive"])
@pytest.mark.parametrize("pre", [IMAGENET, GREY_48], ids=["224-rgb", "48-grey"])
def test_grey_cmyk_and_progressive_jpegs_decode_at_reduced_scale(kind, pre):
    img = photo("astronaut", (2049, 2049))
    blob = {"grey": lambda: jpeg(img.convert("L")), "cmyk": lambda: jpeg(img.convert("CMYK"), quality=95),
            "progressive": lambda: jpeg(img, progressive=True)}[kind]()
    assert Image.open(io.BytesIO(blob)).mode == {"grey": "L", "cmyk": "CMYK", "progressive": "RGB"}[kind]
    assert_close(blob, pre)


def test_a_small_jpeg_is_decoded_in_full():
    blob = jpeg(photo("coffee", (1000, 667)))  # under 4× the 256 that ImageNet's resize needs
    assert probe(blob, max_pixels=LIMIT, pre=IMAGENET).scale == 1
    np.testing.assert_array_equal(preprocess(blob, max_pixels=LIMIT, pre=IMAGENET).pixels, full_decode(blob, IMAGENET))


def test_the_pixel_limit_counts_the_original_and_the_memory_estimate_the_scaled_decode():
    blob = jpeg(Image.new("RGB", (4000, 3000), (90, 120, 150)))
    with pytest.raises(ImageTooLarge):  # though its scaled decode would be 8× smaller on each side
        probe(blob, max_pixels=4000 * 3000 - 1, pre=GREY_48)
    opened = probe(blob, max_pixels=LIMIT, pre=IMAGENET)
    assert opened.img.tile, "probe decoded the pixels"
    w, h = math.ceil(4000 * opened.scale), math.ceil(3000 * opened.scale)
    assert opened.scale == 1 / 4 and opened.cost == w * h * 4  # Pillow holds RGB in 4 bytes a pixel
    assert decode_opened(opened, IMAGENET).size == (w, h)  # what the estimate promised is what decoding holds
