"""The Open Inference Protocol at the byte level, through httpx with the lifespan running: bodies built by hand from
the binary tensor data extension's text (little-endian 4-byte lengths, the JSON header's length in a header), every
malformed or hostile body answered 4xx in the protocol's ``{"error"}`` form and counted once, and readiness."""

from __future__ import annotations

import base64
import gzip
import json
import struct

import numpy as np
import pytest
from service_testing import image_bytes, metric_samples, noise_image, serving

pytestmark = pytest.mark.anyio
INFER = "/v2/models/gray/infer"


def header(count: int, **input_parameters) -> dict:
    tensor = {"name": "images", "shape": [count], "datatype": "BYTES"}
    if input_parameters:
        tensor["parameters"] = input_parameters
    return {"inputs": [tensor]}


def binary_body(blobs: list[bytes], request: dict | None = None, *, declared: int | None = None) -> \
        tuple[bytes, dict[str, str]]:
    """A request as the extension describes it: JSON header, then each element's uint32 LE length and bytes."""
    data = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    request = request or header(len(blobs), binary_data_size=len(data) if declared is None else declared)
    text = json.dumps(request).encode()
    return text + data, {"Inference-Header-Content-Length": str(len(text))}


def split(response) -> tuple[dict, bytes]:
    length = int(response.headers["Inference-Header-Content-Length"])
    return json.loads(response.content[:length]), response.content[length:]


async def test_hand_built_binary_request_and_binary_answer(model_dir, tmp_path):
    blobs = [image_bytes(noise_image(i)) for i in range(2)]
    body, headers = binary_body(blobs, {**header(2, binary_data_size=sum(4 + len(b) for b in blobs)),
                                        "parameters": {"binary_data_output": True},
                                        "outputs": [{"name": "probabilities"}, {"name": "layer3.2.cbam"}]})
    async with serving(model_dir, tmp_path) as (app, client):
        binary = await client.post(INFER, content=body, headers={**headers, "Content-Type": "application/octet-stream"})
        as_json = await client.post(INFER, json={"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                                             "data": [base64.b64encode(b).decode() for b in blobs]}],
                                                 "outputs": [{"name": "probabilities"},
                                                             {"name": "layer3.2.cbam"}]})
    assert binary.status_code == 200 and binary.headers["content-type"] == "application/octet-stream"
    answer, data = split(binary)
    probs_meta, mask_meta = answer["outputs"]
    assert probs_meta == {"name": "probabilities", "datatype": "FP32", "shape": [2, 10],
                          "parameters": {"binary_data_size": 80}}
    assert mask_meta["datatype"] == "UINT8" and mask_meta["parameters"]["binary_data_size"] == 2 * 8 * 8
    assert len(data) == 80 + 128
    probs = np.frombuffer(data[:80], dtype="<f4").reshape(2, 10)
    masks = np.frombuffer(data[80:], dtype=np.uint8).reshape(2, 8, 8)
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    assert "Inference-Header-Content-Length" not in as_json.headers
    json_probs, json_masks = as_json.json()["outputs"]
    np.testing.assert_array_equal(np.array(json_probs["data"], dtype=np.float32).reshape(2, 10), probs)
    np.testing.assert_array_equal(np.array(json_masks["data"], dtype=np.uint8).reshape(2, 8, 8), masks)


def malformed_requests(blob: bytes) -> dict[str, tuple[bytes, dict[str, str], int, str]]:
    """name: (body, headers, status, words in the error)."""
    good, good_headers = binary_body([blob])
    text_length = int(good_headers["Inference-Header-Content-Length"])
    plain = json.dumps(header(1)).encode()
    one = {"inputs": [{**header(1)["inputs"][0], "data": [base64.b64encode(blob).decode()]}]}
    return {
        "header longer than body": (good, {"Inference-Header-Content-Length": str(len(good) + 1)}, 400, "body has"),
        "header length not a number": (good, {"Inference-Header-Content-Length": "12abc"}, 400, "whole number"),
        "binary size disagrees": (*binary_body([blob], declared=5), 400, "binary_data_size 5"),
        "body shorter than binary_data_size": (good[:-10], good_headers, 400, "binary_data_size"),
        "truncated element": (*_truncated(blob), 400, "remain"),
        "more elements than shape": (*binary_body([blob, blob], header(1, binary_data_size=2 * (4 + len(blob)))),
                                     400, "more than the 1"),
        "bytes but no binary_data_size": (plain + good[text_length:],
                                          {"Inference-Header-Content-Length": str(len(plain))}, 400, "follow"),
        "not JSON": (b"{not json", {}, 400, "not an inference request"),
        "deep nesting": (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400, "not an inference request"),
        "parameter not a scalar": (json.dumps({**header(1), "parameters": {"x": {"y": 1}}}).encode(), {}, 400,
                                   "parameters"),
        "two inputs": (json.dumps({"inputs": header(1)["inputs"] * 2}).encode(), {}, 400, "exactly one input"),
        "FP32 input": (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
                       .encode(), {}, 400, "BYTES"),
        "not base64": (json.dumps({"inputs": [{**header(1)["inputs"][0], "data": ["%%%"]}]}).encode(), {}, 400,
                       "base64"),
        "shape and data disagree": (json.dumps({"inputs": [{**header(2)["inputs"][0], "data": ["AAAA"]}]}).encode(),
                                    {}, 400, "[2] but its 'data' holds 1"),
        "huge shape": (json.dumps(header(10**18)).encode(), {}, 413, "limit"),
        "unknown output": (json.dumps({**one, "outputs": [{"name": "logits"}]}).encode(), {}, 400, "logits"),
        "classification out of range": (json.dumps({**one, "outputs": [{"name": "probabilities", "parameters":
                                                                               {"classification": 11}}]}).encode(),
                                        {}, 422, "classification"),
        "brotli body": (good, good_headers | {"Content-Encoding": "br"}, 415, "content-encoding"),
        "gzip bomb": (gzip.compress(b" " * 300_000), {"Content-Encoding": "gzip"}, 413, "larger than"),
        "bad gzip": (b"\x1f\x8b not really", {"Content-Encoding": "gzip"}, 400, "gzip"),
    }


def _truncated(blob: bytes) -> tuple[bytes, dict[str, str]]:
    """An element whose length prefix claims more bytes than the body holds (binary_data_size agrees with it)."""
    data = struct.pack("<I", len(blob) + 100) + blob
    text = json.dumps(header(1, binary_data_size=len(data))).encode()
    return text + data, {"Inference-Header-Content-Length": str(len(text))}


async def test_malformed_and_hostile_bodies_get_protocol_errors_counted_once(model_dir, tmp_path):
    blob = image_bytes(noise_image(3))
    cases = malformed_requests(blob)
    async with serving(model_dir, tmp_path, max_body_bytes=200_000) as (app, client):
        for name, (body, headers, status, words) in cases.items():
            resp = await client.post(INFER, content=body, headers=headers)
            assert resp.status_code == status, (name, resp.text)
            assert list(resp.json()) == ["error"] and words.lower() in resp.json()["error"].lower(), (name, resp.text)
        assert (await client.post(INFER, content=binary_body([blob])[0],
                                  headers=binary_body([blob])[1])).status_code == 200  # still serving
        rejections = metric_samples((await client.get("/metrics")).text, "macula_rejections_total")
    assert sum(rejections.values()) == len(cases)


async def test_auth_version_and_readiness_errors_in_protocol_form(model_dir, tmp_path):
    async with serving(model_dir, tmp_path, api_key="k") as (app, client):
        key = {"X-API-Key": "k"}
        version = (await client.get("/v1/models/gray", headers=key)).json()["version"]
        unauthorized = await client.get("/v2/models/gray", headers={})
        assert unauthorized.status_code == 401 and "API key" in unauthorized.json()["error"]
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        assert (await client.get(f"/v2/models/gray/versions/{version}/ready", headers=key)).json() == \
            {"name": "gray", "ready": True}
        other = await client.get("/v2/models/gray/versions/1/ready", headers=key)
        assert other.status_code == 404 and version in other.json()["error"]
        app.state.service.begin_drain()
        for path in ("/v2/health/ready", "/v2/models/gray/ready", INFER):
            resp = await client.request("POST" if path == INFER else "GET", path, headers=key)
            assert resp.status_code == 503 and resp.headers["Retry-After"] and "draining" in resp.json()["error"]
        assert (await client.get("/v2/health/live")).status_code == 200
