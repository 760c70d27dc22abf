"""The Open Inference Protocol, spoken by Triton's own Python client (tritonclient[http], not our code) to a live
server: health, metadata, inference in JSON and binary form, attention outputs, classification, compression, the
API key, the audit record and errors. What tritonclient sends is the reference: nothing here builds a request."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from service_testing import image_bytes, live_server, model_dir_with, noise_image
from tritonclient.utils import InferenceServerException

from tests.conftest import make_checkpoint

API_KEY = "s3cret-key"
MAX_IMAGES = 4


class BearerToken(triton.InferenceServerClientPlugin):
    """tritonclient's plugin hook adds our API key to every request it sends."""

    def __call__(self, request) -> None:
        request.headers["Authorization"] = f"Bearer {API_KEY}"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, gray_checkpoint, rgb_checkpoint):
    tmp = tmp_path_factory.mktemp("oip")
    plain = make_checkpoint(tmp / "plain.safetensors", attention=None, num_classes=3, seed=2)
    model_dir = model_dir_with(tmp / "models", gray=gray_checkpoint, rgb=rgb_checkpoint, plain=plain)
    with live_server(model_dir, tmp, api_key=API_KEY, max_images_per_request=MAX_IMAGES, max_batch_size=4) as base:
        yield base


@pytest.fixture(scope="module")
def client(base_url):
    client = triton.InferenceServerClient(base_url.removeprefix("http://"), network_timeout=60.0)
    client.register_plugin(BearerToken())
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        yield http


def images() -> list[bytes]:
    """Three images in the three accepted formats (the gray model converts RGB to L itself)."""
    return [image_bytes(noise_image(1), "PNG"), image_bytes(noise_image(2, 48), "JPEG"),
            image_bytes(noise_image(3, 24), "WEBP")]


def binary_input(blobs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))  # binary_data=True: tritonclient's default
    return tensor


def json_input(blobs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(b) for b in blobs], dtype=np.object_), binary_data=False)
    return tensor


def v1_predict(http: httpx.Client, name: str, blobs: list[bytes], **params) -> list[dict]:
    files = [("file", (f"{i}.img", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]
    resp = http.post(f"/v1/models/{name}/predict", files=files, params={"top_k": 10, **params})
    assert resp.status_code == 200, resp.text
    return resp.json()["predictions"]


def server_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def version_of(http: httpx.Client, name: str) -> str:
    return http.get(f"/v1/models/{name}").json()["version"]


def test_server_and_model_health(client, http, base_url):
    anonymous = triton.InferenceServerClient(base_url.removeprefix("http://"))
    assert anonymous.is_server_live() and anonymous.is_server_ready()  # probes need no API key
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("gray") and client.is_model_ready("plain")
    assert client.is_model_ready("gray", version_of(http, "gray"))
    assert not client.is_model_ready("gray", "000000000000")
    assert not client.is_model_ready("no-such-model")
    refused = server_error(lambda: anonymous.get_model_metadata("gray"))
    assert refused.status() == "401" and "API key" in refused.message()
    anonymous.close()


def test_server_and_model_metadata(client, http):
    server = client.get_server_metadata()
    assert server["name"] == "macula" and {"binary_tensor_data", "classification"} <= set(server["extensions"])
    version = version_of(http, "gray")
    meta = client.get_model_metadata("gray")
    assert meta == client.get_model_metadata("gray", version)
    assert meta["name"] == "gray" and meta["versions"] == [version]
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    probabilities, *attention, box = meta["outputs"]
    assert probabilities == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert box == {"name": "input_box", "datatype": "INT32", "shape": [-1, 4]}
    v1_maps = v1_predict(http, "gray", images()[:1], attention="true")[0]["attention"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in attention] == \
        [(m["module"], "UINT8", [-1, m["height"], m["width"]]) for m in v1_maps]
    assert [o["name"] for o in client.get_model_metadata("rgb")["outputs"]] == \
        ["probabilities", "bam1", "bam2", "input_box"]
    assert client.get_model_metadata("plain")["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}, box]
    missing = server_error(lambda: client.get_model_metadata("gray", "000000000000"))
    assert missing.status() == "404" and version in missing.message()


def test_binary_and_json_modes_agree_with_each_other_and_with_v1(client, http):
    blobs = images()
    binary = client.infer("gray", [binary_input(blobs)])  # no outputs named: every output in binary form
    (out,) = binary.get_response()["outputs"]
    assert out["parameters"]["binary_data_size"] == len(blobs) * 10 * 4 and "data" not in out
    probs = binary.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1, dtype=np.float64), 1.0, atol=1e-5)

    as_json = client.infer("gray", [json_input(blobs)],
                           outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    (out,) = as_json.get_response()["outputs"]
    assert len(out["data"]) == 30 and "parameters" not in out
    np.testing.assert_array_equal(as_json.as_numpy("probabilities"), probs)  # same batch, exact float32 in JSON

    for row, prediction in zip(probs, v1_predict(http, "gray", blobs), strict=True):
        v1 = np.zeros(10)
        for entry in prediction["top_k"]:
            v1[entry["index"]] = entry["score"]
        np.testing.assert_allclose(row, v1, rtol=0, atol=1e-6)


def test_attention_outputs_are_the_v1_masks_as_arrays(client, http):
    blobs = images()
    result = client.infer("gray", [binary_input(blobs)], parameters={"attention": True})
    v1 = v1_predict(http, "gray", blobs, attention="true")
    modules = [m["module"] for m in v1[0]["attention"]]
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities", *modules, "input_box"]
    boxes = result.as_numpy("input_box")
    assert boxes.dtype == np.int32 and boxes.tolist() == [prediction["input_box"] for prediction in v1]
    for k, module in enumerate(modules):
        masks = result.as_numpy(module)
        assert masks.dtype == np.uint8 and masks.shape == (3, v1[0]["attention"][k]["height"],
                                                           v1[0]["attention"][k]["width"])
        for n, prediction in enumerate(v1):
            png = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["attention"][k]["png"]))))
            np.testing.assert_array_equal(masks[n], png)
        assert masks.std() > 0  # real maps, not a constant

    one = client.infer("gray", [json_input(blobs)],
                       outputs=[triton.InferRequestedOutput(modules[-1], binary_data=False)])
    (out,) = one.get_response()["outputs"]  # only what was named
    assert out["name"] == modules[-1] and "data" in out
    np.testing.assert_array_equal(one.as_numpy(modules[-1]), result.as_numpy(modules[-1]))


def test_models_without_attention_answer_probabilities_only(client):
    result = client.infer("plain", [binary_input(images()[:2])], parameters={"attention": True})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    assert result.as_numpy("probabilities").shape == (2, 3)
    unknown = server_error(lambda: client.infer("plain", [binary_input(images()[:1])],
                                                outputs=[triton.InferRequestedOutput("layer1.0.cbam")]))
    assert unknown.status() == "400" and "unknown output" in unknown.message()


def test_classification_extension(client):
    blobs = images()
    probs = client.infer("gray", [binary_input(blobs)]).as_numpy("probabilities")
    for binary in (True, False):
        top = client.infer("gray", [binary_input(blobs)],
                           outputs=[triton.InferRequestedOutput("probabilities", binary, class_count=3)])
        labels = top.as_numpy("probabilities")
        assert labels.shape == (3, 3)
        for row, scores in zip(labels, probs, strict=True):
            parsed = [(entry.decode() if binary else entry).split(":") for entry in row]  # JSON: str
            indices = [int(index) for _, index, _ in parsed]
            assert indices == list(np.argsort(-scores, kind="stable")[:3])
            assert [label for *_, label in parsed] == [f"class_{i}" for i in indices]
            np.testing.assert_allclose([float(s) for s, *_ in parsed], scores[indices], rtol=1e-5)


def test_versioned_route_request_id_and_audit_record(client, http):
    version = version_of(http, "rgb")
    result = client.infer("rgb", [binary_input(images()[:2])], model_version=version, request_id="req-7")
    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("rgb", version, "req-7")
    record = http.get(f"/v1/predictions/{answer['parameters']['prediction_id']}").json()
    assert record["route"] == "/v2/models/{name}/versions/{version}/infer"
    assert record["model"]["name"] == "rgb" and len(record["images"]) == 2
    wrong = server_error(lambda: client.infer("rgb", [binary_input(images()[:1])], model_version="0" * 12))
    assert wrong.status() == "404" and "no version" in wrong.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, algorithm):
    blobs = images()
    plain = client.infer("gray", [binary_input(blobs)]).as_numpy("probabilities")
    packed = client.infer("gray", [binary_input(blobs)], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(packed.as_numpy("probabilities"), plain)


def test_errors_reach_the_client_as_protocol_errors(client):
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    cases = [
        (lambda: client.infer("gray", [binary_input([b"not an image at all"])]), "422", "not a recognisable image"),
        (lambda: client.infer("gray", [binary_input([gif.getvalue()])]), "415", "GIF"),
        (lambda: client.infer("no-such-model", [binary_input(images()[:1])]), "404", "unknown model"),
        (lambda: client.infer("gray", [binary_input(images() * 2)]), "413", f"limit is {MAX_IMAGES}"),
        (lambda: client.infer("gray", [binary_input(images()[:1])], parameters={"attention": "yes"}), "422",
         "attention"),
    ]
    for call, status, words in cases:
        error = server_error(call)
        assert error.status() == status and words.lower() in error.message().lower(), (status, error.message())
    wrong_name = triton.InferInput("INPUT0", [1], "BYTES")
    wrong_name.set_data_from_numpy(np.array([images()[0]], dtype=np.object_))
    error = server_error(lambda: client.infer("gray", [wrong_name]))
    assert error.status() == "400" and "'images'" in error.message()
    assert client.is_server_ready()  # nothing above hurt the server
