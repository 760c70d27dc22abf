"""Honest confidence through the service: familiar / familiarity per image, the audit record, the metric, and the
temperature on the scores; checkpoints without a detector answer as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from service_testing import image_bytes, metric_samples, model_dir_with, serving

from models import load_checkpoint
from models.familiarity import probabilities
from tests.calibrated import make_calibrated_checkpoint, normalise, shapes

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    return make_calibrated_checkpoint(tmp_path_factory.mktemp("calibrated") / "shapes.safetensors")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, calibrated, gray_checkpoint):
    return model_dir_with(tmp_path_factory.mktemp("models"), shapes=calibrated, plain=gray_checkpoint)


def pngs(images: np.ndarray) -> list[bytes]:
    return [image_bytes(Image.fromarray(image)) for image in images]


async def predict(client, name: str, blobs: list[bytes], **params) -> dict:
    files = [("file", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    resp = await client.post(f"/v1/models/{name}/predict", files=files, params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_familiar_flag_separates_images_like_the_training_data_from_noise(model_dir, calibrated, tmp_path):
    images = shapes(12, seed=123)[0].numpy()
    noise = np.random.default_rng(0).integers(0, 256, (12, 24, 24), dtype=np.uint8)
    async with serving(model_dir, tmp_path) as (app, client):
        familiar = (await predict(client, "shapes", pngs(images), attention="true"))["predictions"]
        unfamiliar_body = await predict(client, "shapes", pngs(noise))
        app.state.service.audit.flush(5)
        record = (await client.get(f"/v1/predictions/{unfamiliar_body['id']}")).json()
        metrics = (await client.get("/metrics")).text
    unfamiliar = unfamiliar_body["predictions"]
    assert sum(p["familiar"] for p in familiar) >= 10 and not any(p["familiar"] for p in unfamiliar)
    assert all(0.0 <= p["familiarity"] <= 1.0 for p in familiar + unfamiliar)
    assert max(p["familiarity"] for p in unfamiliar) < np.median([p["familiarity"] for p in familiar])
    assert all(len(p["attention"]) == 9 for p in familiar)  # the detector path still returns the masks
    assert [(i["familiar"], i["familiarity"]) for i in record["images"]] == [
        (p["familiar"], p["familiarity"]) for p in unfamiliar]
    counted = metric_samples(metrics, "macula_unfamiliar_inputs_total")
    assert counted == {(("model", "shapes"),): 12 + sum(not p["familiar"] for p in familiar)}


async def search(client, **params) -> list[str]:
    resp = await client.get("/v1/predictions", params=params)
    assert resp.status_code == 200, resp.text
    return [item["id"] for item in resp.json()["items"]]


async def test_audit_search_filters_by_the_familiar_flag(model_dir, tmp_path):
    images = pngs(shapes(6, seed=321)[0].numpy())
    noise = pngs(np.random.default_rng(2).integers(0, 256, (2, 24, 24), dtype=np.uint8))
    async with serving(model_dir, tmp_path) as (app, client):
        made = [await predict(client, "shapes", images), await predict(client, "shapes", noise),
                await predict(client, "shapes", [images[0], noise[0]]), await predict(client, "plain", noise)]
        app.state.service.audit.flush(5)
        newest_first = [body["id"] for body in reversed(made)]
        found = {flag: await search(client, familiar=flag) for flag in ("true", "false")}
        everything = await search(client)
        # the noise image's label, with and without the flag of that same image
        label = made[2]["predictions"][1]["top_k"][0]["label"]
        by_label = {flag: await search(client, label=label, familiar=flag) for flag in ("true", "false")}
        csv_rows = (await client.get("/v1/predictions/export", params={"format": "csv"})).text.splitlines()
    flags = [[p.get("familiar") for p in body["predictions"]] for body in made]
    assert flags[1] == [False, False] and flags[2][1] is False and flags[3] == [None, None]
    assert any(flags[0])   # shapes like the training data: (mostly) familiar
    expected = {flag: [pid for pid, body in zip(newest_first, reversed(made), strict=True)
                       if any(p.get("familiar") is (flag == "true") for p in body["predictions"])]
                for flag in ("true", "false")}
    assert found == expected and made[1]["id"] in found["false"] and made[0]["id"] in found["true"]
    assert made[3]["id"] in everything and made[3]["id"] not in found["true"] + found["false"]   # no detector
    for flag, ids in by_label.items():   # label and familiar must hold for one and the same image
        assert ids == [pid for pid, body in zip(newest_first, reversed(made), strict=True)
                       if any(p.get("familiar") is (flag == "true") and p["top_k"][0]["label"] == label
                              for p in body["predictions"])]
    assert made[2]["id"] in by_label["false"]
    assert csv_rows[0].endswith(",familiar") and csv_rows[1].endswith(",")   # the plain model's image: no flag


async def test_scores_use_the_checkpoints_temperature(model_dir, calibrated, tmp_path):
    model, meta = load_checkpoint(calibrated)
    images = shapes(4, seed=7)[0]
    with torch.inference_mode():
        expected = probabilities(model(normalise(images)), meta.calibration).numpy()
    async with serving(model_dir, tmp_path) as (_, client):
        got = (await predict(client, "shapes", pngs(images.numpy()), top_k=2))["predictions"]
    for row, item in zip(expected, got, strict=True):
        assert {t["index"]: t["score"] for t in item["top_k"]} == pytest.approx(dict(enumerate(row.tolist())),
                                                                                 abs=1e-4)


async def test_checkpoints_without_a_detector_have_no_familiarity_fields(model_dir, tmp_path):
    blob = image_bytes(Image.fromarray(np.zeros((32, 32), np.uint8)))
    async with serving(model_dir, tmp_path) as (app, client):
        body = await predict(client, "plain", [blob])
        app.state.service.audit.flush(5)
        record = (await client.get(f"/v1/predictions/{body['id']}")).json()
        metrics = (await client.get("/metrics")).text
    assert "familiar" not in body["predictions"][0] and "familiarity" not in body["predictions"][0]
    assert "familiar" not in record["images"][0]
    assert ("model", "plain") not in {k for key in metric_samples(metrics, "macula_unfamiliar_inputs_total")
                                      for k in key}


def test_bf16_serving_keeps_the_familiarity_of_float32(calibrated):
    from service.inference import ModelRunner

    images = np.concatenate([shapes(8, seed=5)[0].numpy(), np.random.default_rng(1).integers(0, 256, (8, 24, 24),
                                                                                                dtype=np.uint8)])
    pixels = images[..., None]
    exact = ModelRunner("s", calibrated, device="cpu", amp_dtype="none").run(pixels)
    fast = ModelRunner("s", calibrated, device="cpu", amp_dtype="bfloat16", native_cpu_bf16=True).run(pixels)
    assert [r.familiar for r in exact[8:]] == [r.familiar for r in fast[8:]] == [False] * 8
    assert sum(a.familiar == b.familiar for a, b in zip(exact[:8], fast[:8], strict=True)) >= 7
    assert max(abs(a.familiarity - b.familiarity) for a, b in zip(exact, fast, strict=True)) < 0.1
