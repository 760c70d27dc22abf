"""The auditor's page draws a centre-crop model's mask where the model looked: inside the record's ``input_box``
(scaled to the picture on screen), with the picture untouched around it. Debian's chromium via Playwright,
against ``python -m service`` as a real process."""

from __future__ import annotations

import io
import math
import re

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from playwright.sync_api import expect

from models import Preprocessing, create_model, save_checkpoint
from tests.e2e.browser import running_service

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SEEN = [132, 26, 508, 401]  # 640×427 under resize 146 → crop 128 (tests/integration/test_service_input_box.py)


def photo_png() -> bytes:
    """640×427, dark, a bright square inside the crop near its right edge and a bright bar beyond it."""
    img = Image.new("RGB", (640, 427), (30, 40, 50))
    draw = ImageDraw.Draw(img)
    draw.rectangle((440, 180, 499, 239), fill=(250, 240, 230))
    draw.rectangle((580, 60, 635, 380), fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def canvas_pixels(page) -> np.ndarray:
    width, height, data = page.locator("#overlay-canvas").evaluate(
        "c => [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]")
    return np.asarray(data, np.uint8).reshape(height, width, 4)[:, :, :3].astype(int)


def test_the_page_draws_the_mask_inside_the_box_the_model_saw(tmp_path, open_page):
    torch.manual_seed(3)
    (tmp_path / "models").mkdir()
    save_checkpoint(create_model("resnet20", attention="cbam", num_classes=4), tmp_path / "models" / "crop.safetensors",
                    preprocessing=Preprocessing(input_size=(128, 128), resize_mode="center_crop", resize_size=146),
                    class_names=["a", "b", "c", "d"])
    with running_service(tmp_path / "models", tmp_path, "--audit-db", str(tmp_path / "audit.db")) as base:
        made = httpx.post(f"{base}/v1/predict", params={"attention": "true"}, timeout=60,
                          files=[("file", ("photo.png", photo_png(), "image/png"))]).json()
        assert made["predictions"][0]["input_box"] == SEEN
        page, _ = open_page(base)
        page.goto(f"/audit/#/p/{made['id']}")
        canvas = page.locator("#overlay-canvas")
        expect(canvas).to_have_attribute("aria-label", re.compile("module "))
        page.get_by_role("slider", name="Opacity").fill("0")
        expect(canvas).to_have_attribute("aria-label", re.compile("opacity 0 %"))
        bare = canvas_pixels(page)
        page.get_by_role("slider", name="Opacity").fill("80")
        expect(canvas).to_have_attribute("aria-label", re.compile("opacity 80 %"))
        drawn = canvas_pixels(page)
    height, width = bare.shape[:2]
    sx, sy = width / 640, height / 427
    x0, y0, x1, y1 = (math.floor(v * s + 0.5) for v, s in zip(SEEN, (sx, sy, sx, sy), strict=True))
    changed = np.abs(drawn - bare).max(axis=2) > 0
    assert not changed[:, :x0].any() and not changed[:, x1:].any(), "the mask reaches where the model saw nothing"
    assert not changed[:y0].any() and not changed[y1:].any()
    assert changed[y0:y1, x0:x1].mean() > 0.9
    assert bare[:, x1:].mean() < bare[:, -round(0.06 * width):].mean()  # the bar outside the box is on screen
