"""service.overlay: masks drawn over the kept input, in the input's geometry (input_box), as PNG."""

from __future__ import annotations

import base64
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from service.codec import png_base64
from service.overlay import (
    COLORMAPS,
    MaskNotFound,
    OverlayError,
    box_in_image,
    colormap_table,
    open_kept_input,
    overlay_png,
    record_mask,
    record_overlay_png,
    render_overlay,
    stretch_contrast,
)


def photo(width: int = 96, height: int = 64) -> Image.Image:
    """A non-square RGB image with a gradient, so every pixel is known and most differ."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def halves_mask(size: int = 8) -> np.ndarray:
    """Left half 0, right half 255."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    return mask


def test_colormap_tables_are_256_rgb_entries_from_dark_to_light():
    for name in COLORMAPS:
        table = colormap_table(name)
        assert table.shape == (256, 3) and table.dtype == np.uint8
        assert not np.array_equal(table[0], table[255]), name
    assert np.array_equal(colormap_table("gray")[:, 0], np.arange(256))
    with pytest.raises(OverlayError, match="unknown colour map"):
        colormap_table("rainbow-unicorn")


def test_overlay_has_the_inputs_size_and_differs_where_the_mask_differs():
    image = photo()
    out = render_overlay(image, halves_mask(), alpha=0.6)
    assert out.size == image.size and out.mode == "RGB"
    pixels, original = np.asarray(out).astype(int), np.asarray(image).astype(int)
    low, high = colormap_table()[0].astype(int), colormap_table()[255].astype(int)
    expected_left = np.round(0.4 * original[:, :8] + 0.6 * low)
    expected_right = np.round(0.4 * original[:, -8:] + 0.6 * high)
    assert np.abs(pixels[:, :8] - expected_left).max() <= 1
    assert np.abs(pixels[:, -8:] - expected_right).max() <= 1
    # the same image under a constant mask differs from the halves overlay on the right only
    flat = np.asarray(render_overlay(image, np.zeros((8, 8), np.uint8), alpha=0.6)).astype(int)
    assert np.array_equal(flat[:, :40], pixels[:, :40])
    assert (np.abs(flat[:, -40:] - pixels[:, -40:]).sum(axis=2) > 30).all()


def test_alpha_zero_is_the_input_and_alpha_one_is_the_colour_map():
    image, mask = photo(), halves_mask()
    assert np.array_equal(np.asarray(render_overlay(image, mask, alpha=0.0)), np.asarray(image))
    solid = np.asarray(render_overlay(image, np.full((4, 4), 128, np.uint8), alpha=1.0, colormap="viridis"))
    assert (solid == colormap_table("viridis")[128]).all()
    with pytest.raises(OverlayError, match="alpha"):
        render_overlay(image, mask, alpha=1.5)


def test_outside_the_input_box_the_image_is_untouched():
    image = photo(160, 100)
    # the model saw a centre crop x 30..130 of the full-size 320x200 original: 15..65 in this half-size copy
    out = np.asarray(render_overlay(image, np.full((4, 4), 255, np.uint8), input_box=[60, 0, 260, 200],
                                    original_size=(320, 200), alpha=0.5)).astype(int)
    original = np.asarray(image).astype(int)
    assert np.array_equal(out[:, :30], original[:, :30])
    assert np.array_equal(out[:, 130:], original[:, 130:])
    assert (np.abs(out[:, 30:130] - original[:, 30:130]).sum(axis=2) > 0).all()


def test_an_off_centre_mask_lands_in_the_box_where_the_model_looked():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    mask = np.zeros((10, 10), np.uint8)
    mask[:5, :5] = 255  # the model looked at the top-left quarter of what it saw
    out = np.asarray(render_overlay(image, mask, input_box=[50, 0, 150, 100], alpha=1.0, colormap="gray"))
    bright = np.argwhere(out[:, :, 0] > 200)
    assert bright[:, 1].min() >= 50 and bright[:, 1].max() < 100   # x: left half of the box
    assert bright[:, 0].max() < 50                                  # y: top half


def test_box_geometry_is_scaled_clipped_and_checked():
    assert box_in_image(None, None, (80, 60)) == (0, 0, 80, 60)
    assert box_in_image([100, 50, 300, 250], (400, 300), (200, 150)) == (50, 25, 150, 125)
    assert box_in_image([-10, -10, 999, 999], (100, 100), (100, 100)) == (0, 0, 100, 100)
    x0, y0, x1, y1 = box_in_image([10, 10, 10.2, 10.2], (100, 100), (10, 10))
    assert x1 > x0 and y1 > y0
    for bad in ([0, 0, 10], [10, 0, 5, 10]):
        with pytest.raises(OverlayError, match="input_box"):
            box_in_image(bad, (100, 100), (100, 100))


def test_contrast_stretch_spreads_a_mask_that_sits_near_one():
    mask = np.array([[240, 250], [252, 255]], np.uint8)
    assert stretch_contrast(mask).tolist() == [[0, 170], [204, 255]]
    assert np.array_equal(stretch_contrast(np.full((3, 3), 252, np.uint8)), np.full((3, 3), 252))
    image = photo()
    near_one = np.full((8, 8), 250, np.uint8)
    near_one[:, 4:] = 255
    plain = np.asarray(render_overlay(image, near_one, alpha=1.0)).astype(int)
    stretched = np.asarray(render_overlay(image, near_one, alpha=1.0, stretch=True)).astype(int)
    assert np.abs(plain[:, 0] - plain[:, -1]).sum() < np.abs(stretched[:, 0] - stretched[:, -1]).sum()


def test_png_bytes_carry_the_module_name():
    data = overlay_png(photo(), halves_mask(), text={"module": "layer1.0.cbam"}, alpha=0.5)
    with Image.open(BytesIO(data)) as png:
        assert png.format == "PNG" and png.size == (96, 64)
        assert png.text["module"] == "layer1.0.cbam"


def record(**image_fields) -> dict:
    masks = {"layer1.0.cbam": halves_mask(), "layer2.0.cbam": np.full((4, 4), 30, np.uint8)}
    attention = [{"module": name, "height": m.shape[0], "width": m.shape[1], "png": png_base64(m)}
                 for name, m in masks.items()]
    return {"id": "abc123", "images": [{"width": 96, "height": 64, "top_k": [], "attention": attention,
                                        **image_fields}]}


def test_record_overlay_picks_the_module_and_uses_the_records_box():
    image = photo(48, 32)   # the kept thumbnail: half the original's 96x64
    first = record_overlay_png(record(), image, image=0, module="layer1.0.cbam")
    second = record_overlay_png(record(), image, image=0, module="layer2.0.cbam")
    with Image.open(BytesIO(first)) as a, Image.open(BytesIO(second)) as b:
        assert a.size == b.size == (48, 32)
        assert a.text["module"] == "layer1.0.cbam" and a.text["prediction"] == "abc123"
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    boxed = record_overlay_png(record(input_box=[32, 0, 64, 64]), image, image=0, module="layer1.0.cbam")
    with Image.open(BytesIO(boxed)) as c:
        pixels, original = np.asarray(c.convert("RGB")).astype(int), np.asarray(image).astype(int)
    assert np.array_equal(pixels[:, :16], original[:, :16]) and np.array_equal(pixels[:, 32:], original[:, 32:])
    assert not np.array_equal(pixels[:, 16:32], original[:, 16:32])


def test_without_a_module_name_the_last_module_is_drawn():
    stored = record_mask(record(), 0, None)
    assert stored.module == "layer2.0.cbam" and stored.mask.shape == (4, 4) and (stored.mask == 30).all()
    with Image.open(BytesIO(record_overlay_png(record(), photo(48, 32), image=0, module=None))) as png:
        assert png.text["module"] == "layer2.0.cbam"


def test_record_overlay_refuses_what_the_record_does_not_have():
    image = photo(48, 32)
    with pytest.raises(MaskNotFound, match="modules: layer1.0.cbam, layer2.0.cbam"):
        record_overlay_png(record(), image, image=0, module="bam9")
    with pytest.raises(MaskNotFound, match="between 0 and 0"):
        record_overlay_png(record(), image, image=1, module="layer1.0.cbam")
    with pytest.raises(MaskNotFound, match="attention=true"):
        record_overlay_png({"id": "x", "images": [{"width": 4, "height": 4}]}, image, image=0, module="m")
    broken = record()
    broken["images"][0]["attention"][0]["png"] = base64.b64encode(b"not a png").decode()
    with pytest.raises(MaskNotFound, match="not a readable PNG"):
        record_overlay_png(broken, image, image=0, module="layer1.0.cbam")


def test_a_kept_original_is_turned_the_way_the_model_saw_it():
    upright = photo(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: the stored pixels must be turned 90 degrees clockwise to display
    buf = BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", exif=exif, quality=95)
    opened = open_kept_input(buf.getvalue())
    assert opened.size == (60, 40)
    assert np.abs(np.asarray(opened.convert("RGB")).astype(int) - np.asarray(upright).astype(int)).mean() < 4
    with pytest.raises(OverlayError, match="cannot be read"):
        open_kept_input(b"not an image")
