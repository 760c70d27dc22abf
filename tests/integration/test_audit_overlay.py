"""GET /v1/predictions/{id}/overlay.png through the app: a mask over the kept input, the input's size, the
mask's geometry, and clear 4xx answers for what cannot be drawn."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.codec import place_mask
from tests.integration.service_testing import image_bytes, serving

pytestmark = pytest.mark.anyio


def wide_photo() -> bytes:
    """120x80 with a bright block left of centre, so the model's masks vary across the picture."""
    pixels = np.full((80, 120), 40, np.uint8)
    pixels[20:60, 15:55] = 230
    return image_bytes(Image.fromarray(pixels, mode="L"))


async def predict(client, *, attention: bool = True) -> dict:
    resp = await client.post("/v1/models/gray/predict", params={"attention": str(attention).lower()},
                             files=[("file", ("wide.png", wide_photo(), "image/png"))])
    assert resp.status_code == 200, resp.text
    return resp.json()


def png_of(resp) -> Image.Image:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(resp.content))
    img.load()
    return img


async def test_overlay_has_the_kept_inputs_size_and_follows_the_mask(model_dir, tmp_path):
    async with serving(model_dir, tmp_path) as (app, client):
        made = await predict(client)
        pid = made["id"]
        app.state.service.audit.flush(10)
        kept = Image.open(io.BytesIO((await client.get(f"/v1/predictions/{pid}/images/0")).content)).convert("RGB")
        modules = [entry["module"] for entry in made["predictions"][0]["attention"]]

        first = png_of(await client.get(f"/v1/predictions/{pid}/overlay.png",
                                        params={"module": modules[0], "alpha": 0.5}))
        assert first.size == kept.size and first.mode == "RGB"
        assert first.text["module"] == modules[0]
        last = png_of(await client.get(f"/v1/predictions/{pid}/overlay.png"))   # default: the last module
        assert last.text["module"] == modules[-1]
        assert not np.array_equal(np.asarray(first), np.asarray(last))

        bare = png_of(await client.get(f"/v1/predictions/{pid}/overlay.png", params={"alpha": 0}))
        assert np.array_equal(np.asarray(bare), np.asarray(kept))

        # alpha 1 in grey: the picture is the module's mask, stretched over the whole input ("stretch" model)
        assert made["predictions"][0]["input_box"] == [0, 0, 120, 80]
        for module, entry in zip(modules, made["predictions"][0]["attention"], strict=True):
            grey = png_of(await client.get(f"/v1/predictions/{pid}/overlay.png",
                                           params={"module": module, "alpha": 1, "colormap": "gray"}))
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["png"]))))
            expected = place_mask(mask, (0, 0, 120, 80), (120, 80), kept.size).astype(int)
            assert np.abs(np.asarray(grey)[:, :, 0].astype(int) - expected).max() <= 1, module


async def test_what_cannot_be_drawn_gets_a_clear_4xx(model_dir, tmp_path):
    async with serving(model_dir, tmp_path, api_key="k") as (app, client):
        client.headers["X-API-Key"] = "k"
        with_masks, without_masks = (await predict(client))["id"], (await predict(client, attention=False))["id"]
        app.state.service.audit.flush(10)
        cases = [
            (f"/v1/predictions/{'0' * 32}/overlay.png", {}, 404, "prediction_not_found"),
            (f"/v1/predictions/{without_masks}/overlay.png", {}, 404, "mask_not_found"),
            (f"/v1/predictions/{with_masks}/overlay.png", {"module": "bam9"}, 404, "mask_not_found"),
            (f"/v1/predictions/{with_masks}/overlay.png", {"image": 3}, 404, "image_not_found"),
            (f"/v1/predictions/{with_masks}/overlay.png", {"alpha": 2}, 422, "invalid_parameter"),
            (f"/v1/predictions/{with_masks}/overlay.png", {"colormap": "jet"}, 422, "invalid_parameter"),
        ]
        for path, params, status, code in cases:
            resp = await client.get(path, params=params)
            assert (resp.status_code, resp.json()["code"]) == (status, code), (params, resp.text)
        assert "layer1.0.cbam" in (await client.get(f"/v1/predictions/{with_masks}/overlay.png",
                                                    params={"module": "bam9"})).json()["detail"]
        del client.headers["X-API-Key"]
        assert (await client.get(f"/v1/predictions/{with_masks}/overlay.png")).status_code == 401


async def test_no_kept_input_no_overlay(model_dir, tmp_path):
    async with serving(model_dir, tmp_path, audit_inputs="none") as (app, client):
        pid = (await predict(client))["id"]
        app.state.service.audit.flush(10)
        resp = await client.get(f"/v1/predictions/{pid}/overlay.png")
        assert (resp.status_code, resp.json()["code"]) == (404, "image_not_found")
