"""The HTTP API through httpx with the lifespan running: inputs, outputs, masks, audit, auth, metrics, errors."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess

import anyio.to_thread
import numpy as np
import pytest
import torch
from PIL import Image
from service_testing import assert_same_predictions, image_bytes, metric_samples, model_dir_with, noise_image, serving
from skimage import data

from models import load_checkpoint

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gray_checkpoint, rgb_checkpoint):
    return model_dir_with(tmp_path_factory.mktemp("models"), gray=gray_checkpoint, rgb=rgb_checkpoint)


def expected_scores(path, blob: bytes) -> np.ndarray:
    """What the model says for ``blob`` via the training eval transform, without the service."""
    model, meta = load_checkpoint(path)
    x = meta.preprocessing.eval_transform()(Image.open(io.BytesIO(blob)))[None]
    with torch.no_grad():
        return model(x).softmax(1)[0].numpy()


async def test_health_ready_and_models(model_dir, tmp_path, gray_checkpoint):
    async with serving(model_dir, tmp_path) as (app, client):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = (await client.get("/readyz")).json()
        assert ready["models"] == ["gray", "rgb"] and ready["default_model"] == "gray"
        listing = (await client.get("/v1/models")).json()
        assert [m["name"] for m in listing["models"]] == ["gray", "rgb"]
        gray = (await client.get("/v1/models/gray")).json()
        _, meta = load_checkpoint(gray_checkpoint)
        assert gray["version"] == meta.version and len(gray["version"]) == 12
        assert (gray["arch"], gray["attention"], gray["num_classes"]) == ("resnet20", "cbam", 10)
        assert gray["input_size"] == [32, 32] and gray["color"] == "L" and gray["classes"] == meta.class_names
        assert gray["precision"] == "float32"  # amp_dtype="none" in these tests
        assert gray["training"]["dataset"] == "random-init"
        missing = await client.get("/v1/models/nope")
        assert missing.status_code == 404 and missing.json()["code"] == "model_not_found"


async def test_predict_all_input_forms_agree_with_the_model(model_dir, tmp_path, rgb_checkpoint):
    photos = [image_bytes(Image.fromarray(getattr(data, n)()).resize((96, 64)), "JPEG") for n in ("chelsea", "coffee")]
    async with serving(model_dir, tmp_path) as (app, client):
        multipart = await client.post("/v1/models/rgb/predict", params={"top_k": 3},
                                      files=[("file", ("a.jpg", photos[0], "image/jpeg")),
                                             ("file", ("b.jpg", photos[1], "image/jpeg"))])
        raw = await client.post("/v1/models/rgb/predict?top_k=3", content=photos[1],
                                headers={"Content-Type": "image/jpeg"})
        as_json = await client.post("/v1/models/rgb/predict?top_k=3", json={"images": [
            base64.b64encode(photos[0]).decode(), "data:image/jpeg;base64," + base64.b64encode(photos[1]).decode()]})
    body = multipart.json()
    assert multipart.status_code == 200 and body["model"]["name"] == "rgb" and len(body["id"]) == 32
    assert len(body["predictions"]) == 2 and all("attention" not in p for p in body["predictions"])
    for photo, pred in zip(photos, body["predictions"], strict=True):
        scores = [t["score"] for t in pred["top_k"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        expected = expected_scores(rgb_checkpoint, photo)
        assert pred["top_k"][0]["index"] == int(expected.argmax())
        for t in pred["top_k"]:
            assert t["label"] == f"class_{t['index']}"
            assert t["score"] == pytest.approx(float(expected[t["index"]]), abs=2e-3)
    assert_same_predictions(raw.json()["predictions"], body["predictions"][1:])
    assert_same_predictions(as_json.json()["predictions"], body["predictions"])


async def test_attention_masks_are_the_models_spatial_maps(model_dir, tmp_path, gray_checkpoint):
    blob = image_bytes(noise_image(1, 48, "L"))
    async with serving(model_dir, tmp_path) as (app, client):
        resp = await client.post("/v1/predict?attention=true&attention_size=original", content=blob,
                                 headers={"Content-Type": "image/png"})
        pred = resp.json()["predictions"][0]
        record = (await client.get(f"/v1/predictions/{resp.json()['id']}")).json()
    model, meta = load_checkpoint(gray_checkpoint)
    x = meta.preprocessing.eval_transform()(Image.open(io.BytesIO(blob)))[None]
    with torch.no_grad():
        _, maps = model.forward_with_attention(x)
    assert [a["module"] for a in pred["attention"]] == list(maps)
    for entry, amap in zip(pred["attention"], maps.values(), strict=True):
        png = Image.open(io.BytesIO(base64.b64decode(entry["png"])))
        assert png.mode == "L" and png.size == (entry["width"], entry["height"])
        expected = (amap.spatial[0, 0] * 255).round().numpy()
        assert np.abs(np.asarray(png, dtype=np.float64) - expected).max() <= 1
        original = entry["original"]
        assert (original["width"], original["height"]) == (48, 48)
        assert Image.open(io.BytesIO(base64.b64decode(original["png"]))).size == (48, 48)
    assert record["images"][0]["attention"] == pred["attention"]


async def test_audit_record_round_trip(model_dir, tmp_path):
    import hashlib

    blob = image_bytes(noise_image(2), "PNG")
    async with serving(model_dir, tmp_path) as (app, client):
        resp = (await client.post("/v1/models/rgb/predict", files={"file": ("x.png", blob, "image/png")})).json()
        app.state.service.audit.flush(5)
        record = (await client.get(f"/v1/predictions/{resp['id']}")).json()
        missing = await client.get("/v1/predictions/" + "0" * 32)
    assert record["id"] == resp["id"] and record["model"] == {**resp["model"], "precision": "float32"}
    assert record["route"] == "/v1/models/{name}/predict" and record["latency_ms"] > 0
    image = record["images"][0]
    assert image["sha256"] == hashlib.sha256(blob).hexdigest() and image["bytes"] == len(blob)
    assert (image["width"], image["height"]) == (40, 40) and image["top_k"] == resp["predictions"][0]["top_k"]
    assert "attention" not in image
    assert missing.status_code == 404 and missing.json()["code"] == "prediction_not_found"


async def test_api_key(model_dir, tmp_path):
    blob = image_bytes(noise_image(3))
    async with serving(model_dir, tmp_path, api_key="k3y") as (app, client):
        def post(headers):
            return client.post("/v1/predict", content=blob, headers={"Content-Type": "image/png", **headers})

        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}):
            denied = await post(headers)
            assert denied.status_code == 401 and denied.json()["code"] == "unauthorized", headers
        assert (await post({"X-API-Key": "k3y"})).status_code == 200
        assert (await post({"Authorization": "Bearer k3y"})).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        for open_route in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(open_route)).status_code == 200, open_route


async def test_torchserve_compatible_routes(model_dir, tmp_path):
    blob = image_bytes(noise_image(4))
    async with serving(model_dir, tmp_path) as (app, client):
        raw = await client.post("/predictions/gray", content=blob, headers={"Content-Type": "image/png"})
        form = await client.post("/predictions/gray", files={"data": ("x.png", blob, "image/png")})
        octet = await client.post("/predictions/gray", content=blob,
                                  headers={"Content-Type": "application/octet-stream"})
        ours = await client.post("/v1/models/gray/predict", content=blob, headers={"Content-Type": "image/png"})
        explained = await client.post("/explanations/gray", content=blob, headers={"Content-Type": "image/png"})
    top5 = {t["label"]: t["score"] for t in ours.json()["predictions"][0]["top_k"]}
    assert len(top5) == 5
    for answer in (raw, form, octet):
        assert list(answer.json()) == list(top5) and np.allclose(list(answer.json().values()), list(top5.values()),
                                                                 atol=1e-5)
    assert [e["module"] for e in explained.json()] == [f"layer{s}.{b}.cbam" for s in (1, 2, 3) for b in range(3)]


async def test_metrics_scrape_passes_promtool(model_dir, tmp_path):
    blob = image_bytes(noise_image(5))
    async with serving(model_dir, tmp_path) as (app, client):
        await client.post("/v1/models/rgb/predict", content=blob, headers={"Content-Type": "image/png"})
        await client.post("/v1/models/rgb/predict", content=b"junk", headers={"Content-Type": "image/png"})
        await client.get("/nope")
        text = (await client.get("/metrics")).text
    requests = metric_samples(text, "macula_requests_total")
    assert requests[(("method", "POST"), ("route", "/v1/models/{name}/predict"), ("status", "200"))] == 1
    assert requests[(("method", "POST"), ("route", "/v1/models/{name}/predict"), ("status", "422"))] == 1
    assert metric_samples(text, "macula_rejections_total")[(("reason", "bad_input"),)] == 1
    assert metric_samples(text, "macula_images_total")[(("model", "rgb"),)] == 1
    assert metric_samples(text, "macula_ready") == {(): 1.0}
    info = metric_samples(text, "macula_model_info")
    assert any(dict(k)["name"] == "gray" and dict(k)["attention"] == "cbam" for k in info)
    assert metric_samples(text, "macula_batch_size_count")[(("model", "rgb"),)] >= 1
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `make system-deps` (Debian package prometheus)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_every_error_has_detail_and_code(model_dir, tmp_path):
    async with serving(model_dir, tmp_path) as (app, client):
        cases = {
            ("GET", "/not/a/route"): (404, "not_found"),
            ("DELETE", "/v1/models"): (405, "method_not_allowed"),
            ("POST", "/v1/predict?top_k=abc"): (422, "invalid_parameter"),
            ("POST", "/v1/predict?attention=maybe"): (422, "invalid_parameter"),
            ("POST", "/v1/predict?attention_size=huge"): (422, "invalid_parameter"),
        }
        for (method, url), (status, code) in cases.items():
            resp = await client.request(method, url)
            assert (resp.status_code, resp.json()["code"]) == (status, code), (method, url, resp.text)
            assert isinstance(resp.json()["detail"], str)


async def test_predictions_and_probes_never_wait_for_starlettes_worker_threads(model_dir, tmp_path, monkeypatch):
    """FastAPI runs a plain ``def`` endpoint or dependency on anyio's worker threads: a hop every request would queue
    for on a busy machine (and a probe that waits too long gets the pod restarted). The dependencies are ``async``;
    blocking work goes to the decode pool."""
    hops = []
    real = anyio.to_thread.run_sync

    async def counting(func, *args, **kwargs):
        hops.append(getattr(func, "__qualname__", repr(func)))
        return await real(func, *args, **kwargs)

    blob = image_bytes(noise_image(4))
    async with serving(model_dir, tmp_path) as (app, client):
        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        answers = [await client.post("/v1/predict?top_k=2", content=blob, headers={"Content-Type": "image/png"}),
                   await client.post("/v1/models/gray/predict", files={"file": ("a.png", blob, "image/png")}),
                   await client.post("/predictions/gray", content=blob, headers={"Content-Type": "image/png"})]
        answers += [await client.get(probe) for probe in ("/healthz", "/readyz", "/metrics")]  # what kubelet asks
        monkeypatch.undo()
    assert [answer.status_code for answer in answers] == [200] * 6
    assert hops == []


async def test_draining_refuses_new_work_but_stays_alive(model_dir, tmp_path):
    blob = image_bytes(noise_image(6))
    async with serving(model_dir, tmp_path) as (app, client):
        app.state.service.begin_drain()
        ready = await client.get("/readyz")
        refused = await client.post("/v1/predict", content=blob, headers={"Content-Type": "image/png"})
        assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
        assert refused.status_code == 503 and refused.json()["code"] == "not_ready" and refused.headers["Retry-After"]
        assert (await client.get("/healthz")).status_code == 200
        assert metric_samples((await client.get("/metrics")).text, "macula_ready") == {(): 0.0}


async def test_audit_store_failure_does_not_fail_predictions(model_dir, tmp_path):
    blob = image_bytes(noise_image(10))
    async with serving(model_dir, tmp_path, audit_db=str(tmp_path / "missing-dir" / "sub" / "audit.db")) as (
            app, client):
        (tmp_path / "missing-dir").write_text("a file where the store wants a directory")
        resp = await client.post("/v1/predict", content=blob, headers={"Content-Type": "image/png"})
        assert resp.status_code == 200
        app.state.service.audit.flush(5)
        text = (await client.get("/metrics")).text
    assert metric_samples(text, "macula_audit_write_failures_total")[()] >= 1


async def test_a_broken_checkpoint_stops_startup(tmp_path, gray_checkpoint):
    from models import CheckpointError

    models = model_dir_with(tmp_path / "models", gray=gray_checkpoint)
    (models / "broken.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        async with serving(models, tmp_path):
            pass
