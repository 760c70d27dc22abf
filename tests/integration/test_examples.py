"""examples/: the committed canvases are what the demo model reads (it classifies every one right, in float32 and
in bf16), make_examples.py draws exactly them again, and the client's overlay puts the mask where it belongs."""

from __future__ import annotations

import base64
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import load_checkpoint
from service.codec import preprocess
from service.inference import ModelRunner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DEMO = ROOT / "model_store" / "demo.safetensors"
DIGITS = [EXAMPLES / f"digit-{n}.png" for n in range(10)]


@pytest.mark.parametrize("amp_dtype", ["none", "bfloat16"])
def test_the_demo_model_reads_every_example_digit_right(amp_dtype: str) -> None:
    """Through the service's own decode and runner; bf16 is forced, so it runs on CPUs without native bf16 too."""
    pre = load_checkpoint(DEMO)[1].preprocessing
    pixels = np.stack([preprocess(path.read_bytes(), max_pixels=1 << 20, pre=pre).pixels for path in DIGITS])
    runner = ModelRunner("demo", DEMO, device="cpu", amp_dtype=amp_dtype, native_cpu_bf16=True)
    results = runner.run(pixels)
    assert [runner.meta.class_names[r.scores.argmax()] for r in results] == [str(n) for n in range(10)]
    assert min(r.scores.max() for r in results) > 0.5  # right with a margin, not by a hair


def test_examples_are_small_and_as_the_model_expects() -> None:
    pre = load_checkpoint(DEMO)[1].preprocessing
    for path in DIGITS:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", pre.input_size[::-1]), path
        assert path.stat().st_size < 4096, path
    with Image.open(EXAMPLES / "cat.jpg") as photo:
        assert photo.format == "JPEG" and photo.mode == "RGB"
    assert (EXAMPLES / "cat.jpg").stat().st_size < 16384


@pytest.mark.slow
def test_make_examples_draws_the_committed_images_again(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(EXAMPLES / "make_examples.py"), "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for path in DIGITS:  # pixels, not bytes: another zlib may compress the same pixels differently
        assert np.array_equal(np.asarray(Image.open(tmp_path / path.name)), np.asarray(Image.open(path))), path
    assert Image.open(tmp_path / "cat.jpg").size == Image.open(EXAMPLES / "cat.jpg").size


def load_client():
    spec = importlib.util.spec_from_file_location("examples_client", EXAMPLES / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_client_overlay_puts_the_mask_over_the_image() -> None:
    """A mask that is 1 on the left half and 0 on the right: red (jet's top) left, blue (its bottom) right."""
    mask = np.zeros((12, 12), np.uint8)
    mask[:, :6] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    out = np.asarray(load_client().overlay(Image.open(DIGITS[7]), base64.b64encode(buf.getvalue()).decode()))
    assert out.shape == (384, 384, 3)  # the 48x48 canvas, enlarged 8x to be seen
    left, right = out[:, :150].reshape(-1, 3).mean(0), out[:, -150:].reshape(-1, 3).mean(0)
    assert left[0] > left[2] + 40 and right[2] > right[0] + 40, (left, right)


def test_client_overlay_stays_inside_the_box_the_model_saw() -> None:
    """A crop model saw columns 100..499 of a 600x300 photo: the mask lands there, the sides stay as they were."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 600, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(buf, format="PNG")
    out = np.asarray(load_client().overlay(photo, base64.b64encode(buf.getvalue()).decode(), [100, 0, 500, 300]))
    np.testing.assert_array_equal(out[:, :100], np.asarray(photo)[:, :100])
    np.testing.assert_array_equal(out[:, 500:], np.asarray(photo)[:, 500:])
    assert np.abs(out[:, 100:500].astype(int) - np.asarray(photo)[:, 100:500]).mean() > 20
