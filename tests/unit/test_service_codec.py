"""The codec: every image mode decodes deterministically, the result matches the training eval transform,
and hostile files are refused with the right error before any pixel is decoded."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from models import Preprocessing
from service.codec import ImageError, _center_crop, _resize_size, normalise, png_base64, preprocess, to_pixels
from service.errors import CODES, classify
from service.inputs import MalformedRequest, decode_base64

RGB_PRE = Preprocessing(input_size=(64, 64), resize_mode="center_crop", resize_size=72)
GRAY_PRE = Preprocessing(input_size=(32, 32), resize_mode="stretch", resize_size=32, mean=(0.5,), std=(0.25,),
                         color="L")
LIMIT = 40_000_000
# PIL's and torchvision's antialiased uint8 resizes may differ by one grey level: 1 / 255 / std.
ONE_LEVEL = 1 / 255 / 0.224 + 1e-4


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def model_input(blob: bytes, pre: Preprocessing, max_pixels: int = LIMIT) -> np.ndarray:
    """Float (C, H, W) as the runner sees it: the codec's uint8 pixels, normalised."""
    return normalise(preprocess(blob, max_pixels=max_pixels, pre=pre).pixels, pre)


def reference(blob: bytes, pre: Preprocessing) -> np.ndarray:
    return pre.eval_transform()(Image.open(io.BytesIO(blob))).numpy()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(data.chelsea())  # 451 x 300, RGB


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "1"])
@pytest.mark.parametrize("pre", [RGB_PRE, GRAY_PRE], ids=["rgb", "gray"])
def test_png_modes_match_the_eval_transform(photo, mode, pre):
    blob = encode(photo.convert(mode))
    out = preprocess(blob, max_pixels=LIMIT, pre=pre)
    assert out.pixels.shape == (*pre.input_size, len(pre.mean)) and out.pixels.dtype == np.uint8
    expected, ours = reference(blob, pre), normalise(out.pixels, pre)
    assert ours.shape == expected.shape == (len(pre.mean), *pre.input_size)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= ONE_LEVEL


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_match_the_eval_transform(photo, fmt):
    blob = encode(photo, fmt, quality=90)
    pre = Preprocessing(input_size=(128, 128), resize_size=146)  # under 4× the photo: the JPEG is decoded in full
    assert np.abs(model_input(blob, pre) - reference(blob, pre)).max() <= ONE_LEVEL


@pytest.mark.parametrize("size", [(500, 400), (400, 500), (333, 257), (72, 72), (640, 480), (60, 300)])
def test_resizing_only_the_cropped_region_equals_resize_then_crop(photo, size):
    img = photo.resize(size)
    full = img.resize(_resize_size(*size, RGB_PRE), Image.Resampling.BILINEAR)
    expected = _center_crop(np.asarray(full), *RGB_PRE.input_size)
    diff = np.abs(to_pixels(img, RGB_PRE).astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_crop_larger_than_the_resized_image_is_zero_padded(photo):
    pre = Preprocessing(input_size=(64, 64), resize_mode="center_crop", resize_size=48)
    pixels = to_pixels(photo, pre)
    assert pixels.shape == (64, 64, 3) and pixels[:8].max() == 0 and pixels[32].max() > 0


def test_cmyk_jpeg_is_converted_like_pillow_does(photo):
    blob = encode(photo.convert("CMYK"), "JPEG", quality=95)
    pre = Preprocessing(input_size=(224, 224), resize_size=256)  # large enough that no draft scaling kicks in
    assert np.abs(model_input(blob, pre) - reference(blob, pre)).max() <= ONE_LEVEL


def test_sixteen_bit_grey_is_scaled_not_clipped():
    camera = data.camera()  # uint8
    blob16 = encode(Image.fromarray(camera.astype(np.uint16) * 257))
    assert Image.open(io.BytesIO(blob16)).mode.startswith("I")
    out16 = preprocess(blob16, max_pixels=LIMIT, pre=GRAY_PRE).pixels
    out8 = preprocess(encode(Image.fromarray(camera)), max_pixels=LIMIT, pre=GRAY_PRE).pixels
    np.testing.assert_array_equal(out16, out8)


@pytest.mark.parametrize("pre", [RGB_PRE, GRAY_PRE], ids=["rgb", "gray"])
def test_one_pixel_image(pre):
    out = preprocess(encode(Image.new("RGB", (1, 1), (200, 100, 50))), max_pixels=LIMIT, pre=pre)
    assert out.pixels.shape == (*pre.input_size, len(pre.mean))
    assert (out.width, out.height) == (1, 1)
    assert np.ptp(out.pixels, axis=(0, 1)).max() == 0  # a uniform image stays uniform


def test_palette_with_transparency_keeps_the_palette_colour():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    out = preprocess(encode(img, transparency=0), max_pixels=LIMIT, pre=RGB_PRE)
    mean, std = np.array(RGB_PRE.mean), np.array(RGB_PRE.std)
    np.testing.assert_allclose(normalise(out.pixels, RGB_PRE)[:, 0, 0], (np.array([1.0, 0.0, 0.0]) - mean) / std,
                               atol=1e-5)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the white half ends up on top
    blob = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    pre = Preprocessing(input_size=(40, 20), resize_mode="stretch", resize_size=40, mean=(0.0,), std=(1.0,),
                        color="L")
    out = preprocess(blob, max_pixels=LIMIT, pre=pre)
    assert (out.width, out.height) == (20, 40)
    assert out.pixels[:15, :, 0].mean() > 230 and out.pixels[25:, :, 0].mean() < 25


def test_large_jpeg_decoded_at_reduced_scale_stays_close(photo):
    big = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
    blob = encode(big, "JPEG", quality=95)
    diff = np.abs(model_input(blob, RGB_PRE) - reference(blob, RGB_PRE))  # see test_service_codec_scaled.py
    assert diff.mean() < 0.6 * ONE_LEVEL and diff.max() < 6 * ONE_LEVEL


def test_animated_webp_uses_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out = preprocess(buf.getvalue(), max_pixels=LIMIT, pre=RGB_PRE)
    assert out.pixels[..., 0].mean() > out.pixels[..., 2].mean()  # red, not blue


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data: a cheap 'bomb'."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _tiff(photo):
    return encode(photo, "TIFF", save_all=True, append_images=[photo])


HOSTILE = {
    "empty": (lambda p: b"", 400, "bad_request"),
    "random bytes": (lambda p: np.random.default_rng(0).bytes(4096), 422, "undecodable_image"),
    "truncated jpeg": (lambda p: encode(p, "JPEG")[:2000], 422, "undecodable_image"),
    "png bomb 20000x20000": (lambda p: png_header_only(20000, 20000), 413, "image_too_large"),
    "gif": (lambda p: encode(p, "GIF"), 415, "unsupported_media_type"),
    "multipage tiff": (_tiff, 415, "unsupported_media_type"),
    "eps": (lambda p: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", 415,
            "unsupported_media_type"),
    "bmp": (lambda p: encode(p, "BMP"), 415, "unsupported_media_type"),
    "corrupt png body": (lambda p: png_header_only(64, 64), 422, "undecodable_image"),
    "png signature, garbage header": (lambda p: b"\x89PNG\r\n\x1a\n broken", 422, "undecodable_image"),
    "svg": (lambda p: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', 415,
            "unsupported_media_type"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_refused(photo, case):
    make, status, code = HOSTILE[case]
    with pytest.raises(ImageError) as info:
        preprocess(make(photo), max_pixels=LIMIT, pre=RGB_PRE)
    got = classify(info.value)[0]
    assert (CODES[got].status, got) == (status, code), str(info.value)


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(ImageError) as info:
        preprocess(encode(Image.new("L", (100, 100))), max_pixels=9_999, pre=GRAY_PRE)
    assert CODES[classify(info.value)[0]].status == 413


def test_strict_base64():
    raw = encode(Image.new("L", (2, 2)))
    text = base64.b64encode(raw).decode()
    assert decode_base64(text) == raw
    assert decode_base64("data:image/png;base64," + text) == raw
    for bad in (text[:-2] + "!!", "not base64 at all", "data:image/png," + text, text + "\n"):
        with pytest.raises(MalformedRequest) as info:
            decode_base64(bad)
        assert CODES[classify(info.value)[0]].status == 400


def test_mask_png_is_8_bit_grey_with_the_exact_values():
    mask = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    img = Image.open(io.BytesIO(base64.b64decode(png_base64(mask))))
    assert img.format == "PNG" and img.mode == "L" and img.size == (8, 6)
    np.testing.assert_array_equal(np.asarray(img), mask)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_same_top1_as_the_eval_transform_on_real_photos(rgb_checkpoint, name):
    import torch

    from models import load_checkpoint

    model, meta = load_checkpoint(rgb_checkpoint)
    photo = Image.fromarray(getattr(data, name)())
    for img in (photo, photo.resize((photo.width * 3, photo.height * 3))):  # the second one takes the draft path
        blob = encode(img, "JPEG", quality=92)
        ours = torch.from_numpy(model_input(blob, meta.preprocessing))
        theirs = meta.preprocessing.eval_transform()(Image.open(io.BytesIO(blob)))
        with torch.no_grad():
            logits = model(torch.stack([ours, theirs]))
        assert logits[0].argmax() == logits[1].argmax()
        assert (logits[0].softmax(0) - logits[1].softmax(0)).abs().max() < 0.02


def test_sixteen_bit_narrowing_is_round_v_over_257_strip_by_strip(monkeypatch):
    import service.codec as codec

    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (37, 23), dtype=np.uint16)
    monkeypatch.setattr(codec, "STRIP_PIXELS", 50)  # two rows a strip: every strip boundary is exercised
    got = np.asarray(codec.canonical_mode(Image.fromarray(values), "L"))
    np.testing.assert_array_equal(got, np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    wide = Image.fromarray(np.array([[-5, 0, 128, 129, 65535, 70000, 2**30]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(codec.canonical_mode(wide, "L")), [[0, 0, 0, 1, 255, 255, 255]])


def test_probe_reads_headers_only_and_still_reports_the_oriented_size():
    from service.codec import finish, probe

    plain = encode(Image.new("L", (60, 40)))
    opened = probe(plain, max_pixels=LIMIT, pre=GRAY_PRE)
    assert opened.img.tile, "probe decoded the pixels (Pillow looks for a PNG's EXIF after them)"
    assert finish(opened, plain, GRAY_PRE).width == 60
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: the original is 40 wide, 60 high once oriented
    for fmt in ("PNG", "JPEG"):
        rotated = encode(Image.new("L", (60, 40)), fmt, exif=exif)
        done = finish(probe(rotated, max_pixels=LIMIT, pre=GRAY_PRE), rotated, GRAY_PRE)
        assert (done.width, done.height) == (40, 60), fmt
