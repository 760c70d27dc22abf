"""``modules=`` picks which attention modules' masks come back; original-size masks are spread over the decode pool
and equal the feature-size mask placed over the image (8-bit bilinear); bad names are 422 naming the bad one."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from service_testing import image_bytes, model_dir_with, noise_image, serving

from service.codec import place_mask
from tests.conftest import make_checkpoint

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def models(tmp_path_factory, gray_checkpoint):
    plain = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "plain.safetensors", attention=None)
    return model_dir_with(tmp_path_factory.mktemp("models"), gray=gray_checkpoint, plain=plain)


def png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


async def test_modules_selects_masks_in_network_order_and_implies_attention(models, tmp_path):
    blobs = [image_bytes(noise_image(seed, 60 + 10 * seed, "L")) for seed in range(3)]
    async with serving(models, tmp_path) as (app, client):
        listed = (await client.get("/v1/models/gray")).json()["attention_modules"]
        everything = (await client.post("/v1/models/gray/predict?attention=true&attention_size=original",
                                        files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]))
        wanted = [listed[-1], listed[0], listed[-1]]  # out of order and repeated: network order, once each
        picked = (await client.post(f"/v1/models/gray/predict?attention_size=original&modules={','.join(wanted)}",
                                    files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]))
        plain = (await client.get("/v1/models/plain")).json()["attention_modules"]
    assert len(listed) > 2 and plain == []
    assert everything.status_code == 200 and picked.status_code == 200, picked.text
    for i, (full, some) in enumerate(zip(everything.json()["predictions"], picked.json()["predictions"], strict=True)):
        assert [a["module"] for a in full["attention"]] == listed
        assert [a["module"] for a in some["attention"]] == [listed[0], listed[-1]]
        by_module = {a["module"]: a for a in full["attention"]}
        for entry in some["attention"]:
            assert entry == by_module[entry["module"]]  # same masks, whichever way they were asked for
            feature, original = png(entry["png"]), png(entry["original"]["png"])
            side = 60 + 10 * i
            assert original.shape == (side, side)  # each image's own size, in input order
            placed = place_mask(feature, tuple(some["input_box"]), (side, side), (side, side))
            np.testing.assert_array_equal(original, placed)


async def test_bad_modules_are_422_naming_the_bad_one_before_the_body_is_read(models, tmp_path):
    async with serving(models, tmp_path) as (app, client):
        listed = (await client.get("/v1/models/gray")).json()["attention_modules"]
        cases = {f"/v1/models/gray/predict?modules={listed[0]},layer9.cbam": "'layer9.cbam'",
                 "/v1/models/gray/predict?modules=": "modules",
                 f"/v1/models/gray/predict?modules={listed[0]},,{listed[1]}": "modules",
                 f"/v1/models/plain/predict?modules={listed[0]}": "no attention modules"}
        for url, named in cases.items():
            resp = await client.post(url)  # no body: the parameter is refused first
            assert resp.status_code == 422 and resp.json()["code"] == "invalid_parameter", (url, resp.text)
            assert named in resp.json()["detail"], resp.json()


async def test_the_mask_budget_counts_only_the_modules_asked_for(models, tmp_path):
    blob = image_bytes(noise_image(4, 64, "L"))
    async with serving(models, tmp_path, max_mask_bytes=3 * 64 * 64) as (app, client):
        listed = (await client.get("/v1/models/gray")).json()["attention_modules"]
        refused = await client.post("/v1/predict?attention=true&attention_size=original", content=blob,
                                    headers={"Content-Type": "image/png"})
        allowed = await client.post(f"/v1/predict?attention_size=original&modules={','.join(listed[:3])}",
                                    content=blob, headers={"Content-Type": "image/png"})
    assert refused.status_code == 413 and refused.json()["code"] == "response_too_large"
    assert allowed.status_code == 200 and len(allowed.json()["predictions"][0]["attention"]) == 3
