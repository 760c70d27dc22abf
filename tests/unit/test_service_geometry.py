"""service.codec's mask geometry: ``input_box`` is the region of the original image that the model's input shows
(checked against torchvision's own eval transform, not against the codec's formula), through JPEG draft decoding
and EXIF rotation, and original-size masks are placed in it and 0 outside it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from models import Preprocessing
from service.codec import input_box, place_mask, preprocess, scaled_box

CROP = Preprocessing(input_size=(128, 128), resize_mode="center_crop", resize_size=146)
LIMIT = 40_000_000


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def seen_extent(width: int, height: int, pre: Preprocessing) -> tuple[float, float, float, float]:
    """The extent of the original image that the eval transform's output spans, measured with torchvision itself:
    the transform's resize + crop applied to coordinate ramps (pixel j holds j). Antialiased bilinear resizing keeps
    a ramp linear away from the borders, so the first and last output columns hold the source coordinates of their
    centres (to a few hundredths of a pixel: the filter's weights are sampled at whole source pixels, not
    symmetrically about the centre); half an output pixel (the ramp's slope) beyond them are the edges of what the
    model saw."""
    resize = [v2.Resize(pre.resize_size, antialias=True), v2.CenterCrop(pre.input_size)]
    xs = torch.arange(width, dtype=torch.float64).expand(1, height, width)
    ys = torch.arange(height, dtype=torch.float64)[:, None].expand(1, height, width)
    edges = []
    for ramp, axis in ((xs, 2), (ys, 1)):
        out = v2.Compose(resize)(ramp.contiguous())[0]
        line = out[0] if axis == 2 else out[:, 0]
        slope = (line[-1] - line[0]) / (len(line) - 1)
        edges.append((float(line[0] + 0.5 - slope / 2), float(line[-1] + 0.5 + slope / 2)))
    (x0, x1), (y0, y1) = edges
    return x0, y0, x1, y1


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (500, 500), (1001, 333), (300, 451)])
def test_the_box_is_what_the_eval_transform_keeps(size):
    box = input_box(size, CROP)
    measured = seen_extent(*size, CROP)
    assert all(abs(ours - theirs) <= 0.5 + 0.05 for ours, theirs in zip(box, measured, strict=True)), (box, measured)


def test_the_issue_photo_box_is_the_centre_crop():
    # 427 → 146 (short side), 640 → int(146 · 640 / 427) = 218; crop 128 at round(45.0) = 45, round(9.0) = 9;
    # back in original pixels: 45 · 640/218 = 132.1, 173 · 640/218 = 507.9, 9 · 427/146 = 26.3, 137 · 427/146 = 400.7
    assert input_box((640, 427), CROP) == (132, 26, 508, 401)


def test_stretch_shows_the_whole_image_and_padding_keeps_the_image_extent():
    stretch = Preprocessing(input_size=(32, 32), resize_mode="stretch", resize_size=32)
    assert input_box((640, 427), stretch) == (0, 0, 640, 427)
    padded = Preprocessing(input_size=(64, 256), resize_mode="center_crop", resize_size=72)  # wider than resized
    assert input_box((100, 100), padded) == (0, 6, 100, 94)  # cropped vertically (4..68 of 72), padded across


def test_a_drafted_jpeg_gets_the_box_of_the_full_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (2667, 4000, 3), dtype=np.uint8))
    pre = Preprocessing(input_size=(64, 64), resize_mode="center_crop", resize_size=72)
    decoded = preprocess(encode(img, "JPEG", quality=80), max_pixels=LIMIT, pre=pre)
    assert (decoded.width, decoded.height) == (4000, 2667)
    assert decoded.input_box == input_box((4000, 2667), pre)  # resampled as the full decode would be


def test_the_box_follows_exif_rotation():
    img = Image.new("RGB", (640, 427))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90°: 427 wide, 640 tall
    decoded = preprocess(encode(img, "JPEG", exif=exif.tobytes()), max_pixels=LIMIT, pre=CROP)
    assert (decoded.width, decoded.height) == (427, 640)
    assert decoded.input_box == input_box((427, 640), CROP) == (26, 132, 401, 508)


def test_a_placed_mask_fills_its_box_and_is_zero_elsewhere():
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8) + 100
    placed = place_mask(mask, (132, 26, 508, 401), (640, 427), (640, 427))
    assert placed.shape == (427, 640)
    inside = placed[26:401, 132:508]
    assert inside.min() >= 100 and placed.sum() == inside.sum()
    expected = np.asarray(Image.fromarray(mask, mode="L").resize((376, 375), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(inside, expected)
    assert inside[:, :40].mean() < inside[:, -40:].mean()  # left stays left: values grow along x


def test_a_placed_mask_on_a_smaller_canvas_scales_the_box():
    assert scaled_box((132, 26, 508, 401), (640, 427), (320, 214)) == (66, 13, 254, 201)
    placed = place_mask(np.full((4, 4), 255, np.uint8), (132, 26, 508, 401), (640, 427), (320, 214))
    assert placed.shape == (214, 320) and (placed > 0).sum() == (254 - 66) * (201 - 13)
    assert scaled_box((0, 0, 1, 1), (1000, 1000), (10, 10)) == (0, 0, 1, 1)  # never empty
