"""service.oip: the Open Inference Protocol's wire format, bounded, without a server."""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from service import oip
from service.inputs import TooManyImages
from service.limits import BodyTooLarge
from service.state import InvalidParameter

MODULES = ["layer1.0.cbam", "layer2.0.cbam"]


def request(outputs=None, **parameters) -> oip.InferRequestHeader:
    body = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}],
            "parameters": parameters}
    if outputs is not None:
        body["outputs"] = outputs
    return oip.InferRequestHeader.model_validate(body)


def test_bytes_elements_round_trip_as_little_endian_length_prefixed():
    elements = [b"", b"\x00\xff" * 3, bytes(range(256))]
    packed = oip.serialize_bytes(elements)
    assert packed[:4] == b"\x00\x00\x00\x00" and packed[4:8] == struct.pack("<I", 6) == b"\x06\x00\x00\x00"
    assert oip.deserialize_bytes(packed, 3) == elements
    with pytest.raises(oip.BadInferRequest, match="inside the length"):
        oip.deserialize_bytes(packed + b"\x01\x00", 4)
    with pytest.raises(oip.BadInferRequest, match="holds 3 elements"):
        oip.deserialize_bytes(packed, 4)


def test_binary_request_split_at_the_declared_header_length():
    data = oip.serialize_bytes([b"img-a", b"img-b"])
    text = json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    parsed = oip.parse_request(text + data, len(text), max_images=2)
    assert parsed.images == [b"img-a", b"img-b"]
    with pytest.raises(TooManyImages):
        oip.parse_request(text + data, len(text), max_images=1)
    for bad in (0, len(text) + len(data) + 1):
        with pytest.raises(oip.BadInferRequest, match="Inference-Header-Content-Length"):
            oip.parse_request(text + data, bad, max_images=2)


@pytest.mark.parametrize("value", ["-1", "1e3", "0x10", "\u0663", "9" * 20, ""])
def test_header_length_is_a_plain_decimal(value):
    with pytest.raises(oip.BadInferRequest):
        oip.header_length(value)


def test_header_length_values():
    assert oip.header_length(None) is None and oip.header_length(" 42 ") == 42


@pytest.mark.parametrize("encoding, pack", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_decompression_is_bounded(encoding, pack):
    assert oip.decompress(pack(b"x" * 1000), encoding, 1000) == b"x" * 1000
    with pytest.raises(BodyTooLarge):
        oip.decompress(pack(b"x" * 1001), encoding, 1000)
    with pytest.raises(oip.BadInferRequest, match="truncated or has data after"):
        oip.decompress(pack(b"x" * 10) + b"junk", encoding, 1000)
    with pytest.raises(oip.BadInferRequest, match="truncated"):
        oip.decompress(pack(b"x" * 1000)[:-6], encoding, 1000)


def test_requested_outputs_default_named_attention_and_binary_forms():
    assert oip.requested_outputs(request(), MODULES, 10) == [oip.OutputSpec("probabilities", False)]
    specs = oip.requested_outputs(request([{"name": MODULES[1], "parameters": {"binary_data": False}}],
                                          attention=True, binary_data_output=True), MODULES, 10)
    assert specs == [oip.OutputSpec(MODULES[1], False), oip.OutputSpec(MODULES[0], True),
                     oip.OutputSpec("input_box", True)]  # masks come with the region of the image they cover
    assert oip.requested_outputs(request([{"name": "input_box"}]), [], 10) == [oip.OutputSpec("input_box", False)]
    assert oip.requested_outputs(request(attention=True), [], 10) == [oip.OutputSpec("probabilities", False)]
    top = oip.requested_outputs(request([{"name": "probabilities", "parameters": {"classification": 3}}]), [], 10)
    assert top == [oip.OutputSpec("probabilities", False, 3)]


@pytest.mark.parametrize("outputs, parameters, error", [
    ([{"name": "probabilities"}] * 2, {}, oip.BadInferRequest),
    ([{"name": MODULES[0], "parameters": {"classification": 2}}], {}, oip.BadInferRequest),
    ([{"name": "probabilities", "parameters": {"classification": True}}], {}, InvalidParameter),
    ([{"name": "probabilities", "parameters": {"classification": 11}}], {}, InvalidParameter),
    ([{"name": "probabilities", "parameters": {"shared_memory_region": "r"}}], {}, oip.BadInferRequest),
    ([{"name": "probabilities", "parameters": {"binary_data": 1}}], {}, InvalidParameter),
    (None, {"attention": "true"}, InvalidParameter),
])
def test_requested_outputs_refusals(outputs, parameters, error):
    with pytest.raises(error):
        oip.requested_outputs(request(outputs, **parameters), MODULES, 10)


def test_classification_strings_highest_first_ties_by_index():
    scores = np.array([[0.1, 0.4, 0.4, 0.1]], dtype=np.float32)
    assert oip.classifications(scores, ["a", "b", "c", "d"], 3).tolist() == [[b"0.4:1:b", b"0.4:2:c", b"0.1:0:a"]]


def test_mixed_json_and_binary_answer():
    scores = np.array([[0.25, 0.75]], dtype=np.float32)
    masks = {"m": np.array([[[0, 255], [7, 9]]], dtype=np.uint8)}
    boxes = np.array([[3, 0, 70000, 9]])
    specs = [oip.OutputSpec("m", True), oip.OutputSpec("probabilities", False, 1),
             oip.OutputSpec("probabilities", True), oip.OutputSpec("input_box", True),
             oip.OutputSpec("input_box", False)]
    tensors = oip.output_tensors(specs, scores, masks, ["x", "y"], boxes)
    body, length = oip.encode_response(tensors, specs, {"model_name": "demo"})
    head = json.loads(body[:length])
    assert head["model_name"] == "demo"
    assert [o.get("parameters", {}).get("binary_data_size") for o in head["outputs"]] == [4, None, 8, 16, None]
    assert head["outputs"][1] == {"name": "probabilities", "datatype": "BYTES", "shape": [1, 1], "data": ["0.75:1:y"]}
    assert head["outputs"][4] == {"name": "input_box", "datatype": "INT32", "shape": [1, 4], "data": [3, 0, 70000, 9]}
    assert body[length:] == bytes([0, 255, 7, 9]) + struct.pack("<2f", 0.25, 0.75) + struct.pack("<4i", 3, 0, 70000, 9)
