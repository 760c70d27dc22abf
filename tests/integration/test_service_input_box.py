"""Masks aligned with what the model saw, through the running service: on a 640×427 photo with resize 146 →
centre crop 128 the model sees x ≈ 132..508 only. Every route reports that ``input_box``, original-size masks are
0 outside it, the audit record keeps it, the overlay draws only inside it, and an object outside it changes
nothing."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from service_testing import image_bytes, model_dir_with, serving

from models import Preprocessing, create_model, save_checkpoint

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}
# 427 → 146 (short side), 640 → int(146 · 640 / 427) = 218; crop 128 at (45, 9) of the resized image; in original
# pixels 45 · 640/218 = 132.1, 173 · 640/218 = 507.9, 9 · 427/146 = 26.3, 137 · 427/146 = 400.7.
SEEN = [132, 26, 508, 401]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gray_checkpoint):
    torch.manual_seed(3)
    model = create_model("resnet20", attention="cbam", num_classes=4)
    pre = Preprocessing(input_size=(128, 128), resize_mode="center_crop", resize_size=146)
    crop = tmp_path_factory.mktemp("ckpt") / "crop.safetensors"
    save_checkpoint(model, crop, preprocessing=pre, class_names=["a", "b", "c", "d"])
    return model_dir_with(tmp_path_factory.mktemp("models"), crop=crop, gray=gray_checkpoint)


def photo(*, outside: bool = True) -> Image.Image:
    """640×427, dark, with a bright square near the right edge of the centre crop and (``outside``) a bright bar
    beyond it, at x = 580..635, where the model sees nothing."""
    img = Image.new("RGB", (640, 427), (30, 40, 50))
    draw = ImageDraw.Draw(img)
    draw.rectangle((440, 180, 499, 239), fill=(250, 240, 230))
    if outside:
        draw.rectangle((580, 60, 635, 380), fill=(255, 255, 255))
    return img


def pixels(png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))


async def test_original_size_masks_cover_the_box_the_model_saw(model_dir, tmp_path):
    blob = image_bytes(photo())
    async with serving(model_dir, tmp_path) as (app, client):
        resp = await client.post("/v1/models/crop/predict?attention=true&attention_size=original", content=blob,
                                 headers=PNG)
        without = await client.post("/v1/models/crop/predict", content=image_bytes(photo(outside=False)), headers=PNG)
        app.state.service.audit.flush(5)
        record = (await client.get(f"/v1/predictions/{resp.json()['id']}")).json()
    assert resp.status_code == 200, resp.text
    prediction = resp.json()["predictions"][0]
    assert prediction["input_box"] == SEEN and without.json()["predictions"][0]["input_box"] == SEEN
    x0, y0, x1, y1 = SEEN
    for entry in prediction["attention"]:
        original = entry["original"]
        assert (original["width"], original["height"]) == (640, 427)
        mask = pixels(original["png"])
        assert mask.shape == (427, 640)
        outside = mask.copy()
        outside[y0:y1, x0:x1] = 0
        assert outside.max() == 0, entry["module"]  # nothing where the model saw nothing (x = 630 included)
        feature = Image.fromarray(pixels(entry["png"]), mode="L")
        expected = np.asarray(feature.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(mask[y0:y1, x0:x1], expected)  # the whole map, stretched over the box
        assert mask[y0:y1, x0:x1].max() > 0
    # the bar outside the box never reached the model: same scores to the last bit
    assert prediction["top_k"] == without.json()["predictions"][0]["top_k"]
    assert record["images"][0]["input_box"] == SEEN
    assert record["images"][0]["attention"] == prediction["attention"]


async def test_every_mask_route_reports_the_box(model_dir, tmp_path):
    blob = image_bytes(photo())
    infer = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                         "data": [base64.b64encode(blob).decode(), base64.b64encode(image_bytes(photo().rotate(90,
                                  expand=True))).decode()]}], "parameters": {"attention": True}}
    async with serving(model_dir, tmp_path) as (app, client):
        explained = await client.post("/explanations/crop", content=blob, headers=PNG)
        v2 = await client.post("/v2/models/crop/infer", json=infer)
        named = await client.post("/v2/models/crop/infer", json={**infer, "parameters": {},
                                                                 "outputs": [{"name": "input_box"}]})
        meta = await client.get("/v2/models/crop")
        stretched = await client.post("/v1/models/gray/predict?attention=true&attention_size=original", content=blob,
                                      headers=PNG)
    assert explained.status_code == 200 and all(e["input_box"] == SEEN for e in explained.json())
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["input_box"]["datatype"] == "INT32" and outputs["input_box"]["shape"] == [2, 4]
    assert outputs["input_box"]["data"] == SEEN + [26, 132, 401, 508]  # the portrait copy: the same crop, turned
    assert [o["name"] for o in named.json()["outputs"]] == ["input_box"]
    assert meta.json()["outputs"][-1] == {"name": "input_box", "datatype": "INT32", "shape": [-1, 4]}
    # "stretch" preprocessing: the model sees the whole image, and its masks reach the image's edges
    prediction = stretched.json()["predictions"][0]
    assert prediction["input_box"] == [0, 0, 640, 427]
    assert all(pixels(e["original"]["png"])[:, -1].max() > 0 for e in prediction["attention"])


async def test_the_overlay_draws_inside_the_box_only(model_dir, tmp_path):
    blob = image_bytes(photo())
    async with serving(model_dir, tmp_path, audit_inputs="original") as (app, client):
        made = (await client.post("/v1/models/crop/predict?attention=true", content=blob, headers=PNG)).json()
        app.state.service.audit.flush(5)
        overlays = [await client.get(f"/v1/predictions/{made['id']}/overlay.png", params={"module": entry["module"]})
                    for entry in made["predictions"][0]["attention"]]
    original = np.asarray(photo()).astype(int)
    x0, y0, x1, y1 = SEEN
    for resp in overlays:
        assert resp.status_code == 200, resp.text
        drawn = np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB")).astype(int)
        assert drawn.shape == original.shape
        outside = np.ones(original.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(drawn[outside], original[outside])  # the bar at x = 580..635 untouched
        changed = np.abs(drawn[y0:y1, x0:x1] - original[y0:y1, x0:x1]).max(axis=2) > 0
        assert changed.mean() > 0.9  # the mask fills the box
