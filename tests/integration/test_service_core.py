"""The service core through the app: one predict path, one error handler that counts every rejection once, hostile
JSON and slow decoding answered by design, capped original-size masks, the drain answering in JSON."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest
from PIL import Image
from service_testing import image_bytes, metric_samples, noise_image, serving

from service import inputs
from service import state as state_module
from service.deps import get_service
from service.routers import predict as predict_module
from service.state import Service

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}


def rejections(text: str) -> dict[str, float]:
    return {dict(k)["reason"]: v for k, v in metric_samples(text, "macula_rejections_total").items()}


# ---------------------------------------------------------------------------------------------- one predict path

async def test_every_predict_route_goes_through_service_predict(model_dir, tmp_path, monkeypatch):
    blob = image_bytes(noise_image(1, 40, "L"))
    calls = []
    real = Service.predict

    async def spy(self, model, blobs, **kwargs):
        calls.append((model, len(blobs), kwargs["route"]))
        return await real(self, model, blobs, **kwargs)

    monkeypatch.setattr(Service, "predict", spy)
    async with serving(model_dir, tmp_path) as (app, client):
        for method, url in (("POST", "/v1/predict"), ("POST", "/v1/models/gray/predict"),
                            ("POST", "/predictions/gray"), ("PUT", "/explanations/gray")):
            resp = await client.request(method, url, content=blob, headers=PNG)
            assert resp.status_code == 200, (url, resp.text)
    assert calls == [(None, 1, "/v1/predict"), ("gray", 1, "/v1/models/{name}/predict"),
                     ("gray", 1, "/predictions/{name}"), ("gray", 1, "/explanations/{name}")]


async def test_routes_take_the_service_from_a_typed_dependency(model_dir, tmp_path):
    async with serving(model_dir, tmp_path) as (app, client):
        real, seen = app.state.service, []

        def counting() -> Service:
            seen.append(1)
            return real

        app.dependency_overrides[get_service] = counting
        for url in ("/readyz", "/v1/models", "/v1/models/gray", "/metrics"):
            assert (await client.get(url)).status_code == 200, url
        resp = await client.post("/v1/predict", content=image_bytes(noise_image(2, 40, "L")), headers=PNG)
        assert resp.status_code == 200
    assert len(seen) == 5


async def test_the_default_top_k_is_decided_once_for_every_route(model_dir, tmp_path):
    blob = image_bytes(noise_image(3, 40, "L"))
    async with serving(model_dir, tmp_path) as (app, client):
        ours = (await client.post("/v1/predict", content=blob, headers=PNG)).json()["predictions"][0]["top_k"]
        theirs = (await client.post("/predictions/gray", content=blob, headers=PNG)).json()
    assert len(ours) == len(theirs) == 5 and [t["label"] for t in ours] == list(theirs)


# ---------------------------------------------------------------------------------------------- one error handler

async def test_every_rejection_is_counted_once_validation_errors_included(model_dir, tmp_path):
    async with serving(model_dir, tmp_path, api_key="k3y") as (app, client):
        key = {"X-API-Key": "k3y"}
        before = rejections((await client.get("/metrics")).text)
        for _ in range(3):  # FastAPI's own validation errors
            resp = await client.post("/v1/predict?attention=maybe", content=b"x", headers={**key, **PNG})
            assert resp.status_code == 422 and resp.json()["code"] == "invalid_parameter"
        await client.post("/v1/predict?topk=1", content=b"x", headers={**key, **PNG})  # our own 422
        await client.get("/v1/models/nope", headers=key)  # 404 model
        await client.get("/nowhere", headers=key)  # 404 route
        await client.delete("/v1/models", headers=key)  # 405
        await client.get("/v1/models")  # 401
        await client.post("/v1/predict", content=b"", headers={**key, **PNG})  # 400 empty
        await client.post("/v1/predict", content=b"<svg/>", headers={**key, "Content-Type": "image/svg+xml"})  # 415
        after = rejections((await client.get("/metrics")).text)
    grew = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    assert grew == {"bad_input": 6, "not_found": 2, "unauthorized": 1, "unsupported_format": 1}, grew


async def test_a_405_names_every_method_of_the_path(model_dir, tmp_path):
    async with serving(model_dir, tmp_path) as (app, client):
        resp = await client.delete("/predictions/gray")
    assert resp.status_code == 405 and resp.json()["code"] == "method_not_allowed"
    assert set(resp.headers["Allow"].split(", ")) == {"POST", "PUT"}


# ---------------------------------------------------------------------------------------------- hostile JSON

async def test_deeply_nested_json_is_a_400_and_the_service_carries_on(model_dir, tmp_path):
    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with serving(model_dir, tmp_path) as (app, client):
        for body in (deep, b"[" * 1000 + b"]" * 1000, b'{"x": ' + b'{"a": ' * 50 + b"1" + b"}" * 51):
            resp = await client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
            assert resp.status_code == 400 and resp.json()["code"] == "bad_request", resp.text
        ok = await client.post("/v1/predict", json={"images": [base64.b64encode(image_bytes(noise_image(4, 40)))
                                                              .decode()]})
        assert ok.status_code == 200


async def test_json_image_count_is_checked_while_parsing_off_the_event_loop(model_dir, tmp_path, monkeypatch):
    decoded, threads = [], set()
    real_decode, real_parse = inputs.decode_base64, inputs.json_images

    def counting_decode(text):
        decoded.append(1)
        return real_decode(text)

    def parse_where(*args, **kwargs):
        threads.add(threading.get_ident())
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(inputs, "decode_base64", counting_decode)
    monkeypatch.setattr(inputs, "json_images", parse_where)
    entry = base64.b64encode(image_bytes(Image.new("L", (8, 8)))).decode()
    async with serving(model_dir, tmp_path, max_images_per_request=4) as (app, client):
        resp = await client.post("/v1/predict", json={"images": [entry] * 10_000})
    assert resp.status_code == 413 and resp.json()["code"] == "body_too_large"
    assert len(decoded) == 4  # the fifth entry stopped the parse: nothing beyond the limit was decoded
    assert threads and threading.get_ident() not in threads


# ---------------------------------------------------------------------------------------------- decode budget

def block_decoding(monkeypatch) -> threading.Event:
    """Every decode waits for the returned event (set it before leaving the test)."""
    gate, real = threading.Event(), state_module.finish

    def slow_finish(*args):
        gate.wait(30)
        return real(*args)

    monkeypatch.setattr(state_module, "finish", slow_finish)
    return gate


async def test_decoding_counts_against_the_request_deadline(model_dir, tmp_path, monkeypatch):
    gate = block_decoding(monkeypatch)
    try:
        async with serving(model_dir, tmp_path, request_timeout_s=0.3) as (app, client):
            resp = await client.post("/v1/predict", content=image_bytes(noise_image(5, 40, "L")), headers=PNG)
            assert resp.status_code == 504 and resp.json()["code"] == "deadline_exceeded", resp.text
            assert "decoded" in resp.json()["detail"]
            gate.set()
            assert app.state.service.batcher._expecting["gray"] == 0  # its queue room was given back
            again = await client.post("/v1/predict", content=image_bytes(noise_image(5, 40, "L")), headers=PNG)
            assert again.status_code == 200
    finally:
        gate.set()


async def test_an_image_over_the_decode_memory_budget_is_413_before_decoding(model_dir, tmp_path):
    big = image_bytes(Image.new("RGB", (1000, 1000)))  # ~ 4 MB decoded, 5 MB converted to grey
    async with serving(model_dir, tmp_path, decode_memory_bytes=2_000_000) as (app, client):
        resp = await client.post("/v1/predict", content=big, headers=PNG)
        small = await client.post("/v1/predict", content=image_bytes(Image.new("RGB", (100, 100))), headers=PNG)
    assert resp.status_code == 413 and resp.json()["code"] == "image_too_large" and "MiB" in resp.json()["detail"]
    assert small.status_code == 200


# ---------------------------------------------------------------------------------------------- masks

async def test_original_size_masks_are_capped_in_side_and_in_bytes(model_dir, tmp_path):
    wide = image_bytes(noise_image(6, 64, "L").resize((2000, 1000)))
    async with serving(model_dir, tmp_path, max_mask_side=256, max_mask_bytes=9 * 256 * 128) as (app, client):
        one = await client.post("/v1/predict?attention=true&attention_size=original", content=wide, headers=PNG)
        original = one.json()["predictions"][0]["attention"][0]["original"]
        two = await client.post("/v1/predict?attention=true&attention_size=original",
                                files=[("file", ("a.png", wide, "image/png"))] * 2)
        feature = await client.post("/v1/predict?attention=true", files=[("file", ("a.png", wide, "image/png"))] * 2)
        text = (await client.get("/metrics")).text
    assert one.status_code == 200 and (original["width"], original["height"]) == (256, 128)
    png = Image.open(__import__("io").BytesIO(base64.b64decode(original["png"])))
    assert png.size == (256, 128)
    assert two.status_code == 413 and two.json()["code"] == "response_too_large", two.text
    assert feature.status_code == 200
    assert metric_samples(text, "macula_images_total")[(("model", "gray"),)] == 3  # the refused two never ran


# ---------------------------------------------------------------------------------------------- drain

async def test_a_request_still_decoding_when_the_drain_runs_out_gets_json_503(model_dir, tmp_path, monkeypatch):
    gate = block_decoding(monkeypatch)
    try:
        async with serving(model_dir, tmp_path, drain_timeout_s=0.4) as (app, client):
            pending = asyncio.ensure_future(client.post("/v1/predict", content=image_bytes(noise_image(7, 40, "L")),
                                                        headers=PNG))
            await asyncio.sleep(0.1)
            app.state.service.begin_drain()
            resp = await pending
            gate.set()
    finally:
        gate.set()
    assert resp.status_code == 503 and resp.headers["content-type"] == "application/json"
    assert resp.json()["code"] == "not_ready" and resp.headers["Retry-After"]


async def test_a_request_that_reached_the_server_before_the_signal_is_answered(model_dir, tmp_path, monkeypatch):
    """SIGTERM between a request's arrival and its route (a busy machine): it is still answered; the next is refused."""
    async with serving(model_dir, tmp_path) as (app, client):
        real = predict_module.refuse_unknown

        def signal_then_check(request, allowed):  # the route's first check: the signal lands just before it
            app.state.service.begin_drain()
            real(request, allowed)

        monkeypatch.setattr(predict_module, "refuse_unknown", signal_then_check)
        blob = image_bytes(noise_image(9, 40, "L"))
        answered = await client.post("/v1/predict", content=blob, headers=PNG)
        refused = await client.post("/v1/predict", content=blob, headers=PNG)
        ready = await client.get("/readyz")
    assert answered.status_code == 200, answered.text
    assert (refused.status_code, refused.json()["code"]) == (503, "not_ready")
    assert "draining" in refused.json()["detail"]
    assert ready.status_code == 503


async def test_one_undecodable_image_stops_the_rest_of_its_request_decoding(model_dir, tmp_path, monkeypatch):
    finished = []
    real = state_module.finish

    def counting_finish(*args):
        finished.append(1)
        return real(*args)

    monkeypatch.setattr(state_module, "finish", counting_finish)
    good = image_bytes(noise_image(8, 40, "L"))
    files = [("file", ("bad.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))]
    files += [("file", (f"{i}.png", good, "image/png")) for i in range(20)]
    async with serving(model_dir, tmp_path, decode_threads=1) as (app, client):
        resp = await client.post("/v1/predict", files=files)
        await asyncio.sleep(0.2)
        assert app.state.service.batcher._expecting["gray"] == 0
    assert resp.status_code == 422 and resp.json()["code"] == "undecodable_image"
    assert len(finished) < 20  # the good images queued behind the bad one were never decoded
