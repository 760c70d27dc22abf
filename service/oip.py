"""The Open Inference Protocol's HTTP wire format (KServe v2, Triton's HTTP API) for Macula's one kind of model.

A request holds one ``BYTES`` tensor ``images`` of shape ``[N]``: encoded images, either in the JSON body (each
element a base64 string) or, with the binary tensor data extension, after the JSON header (whose length the
``Inference-Header-Content-Length`` header gives) as 4-byte little-endian lengths each followed by that many bytes.
The answer holds ``probabilities`` (FP32 ``[N, C]``), optionally as the classification extension's top-k strings,
and, when asked, one UINT8 ``[N, h, w]`` tensor per attention module and ``input_box`` (INT32 ``[N, 4]``: the region
``[x0, y0, x1, y1)`` of each original image that the model saw and the masks cover); each in JSON or as binary
data, as asked. ``input_box`` is a tensor, not a response parameter: the protocol's parameters are scalars.

Pure functions on bytes and arrays: nothing here knows HTTP, the batcher or the model. Parsing is bounded by the
body (every declared length is checked against what is there) and blocking: callers run it off the event loop.
The JSON header is validated by pydantic (Rust JSON parser, bounded nesting) against the protocol's schema.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from .inputs import MalformedRequest, TooManyImages, WrongContentType
from .limits import BodyTooLarge
from .state import InvalidParameter

INPUT = "images"
PROBABILITIES = "probabilities"
INPUT_BOX = "input_box"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "Inference-Header-Content-Length"
ENCODINGS = ("gzip", "deflate")  # Content-Encoding of a request body that tritonclient can send
_LENGTH = struct.Struct("<I")

Parameter = bool | StrictInt | float | str  # the protocol's $parameter: $string | $number | $boolean
_SCALAR_TAGS = {"bool", "int", "float", "str"}  # how pydantic names the members of Parameter in an error's location


class BadInferRequest(MalformedRequest):
    """The request does not follow the protocol, or asks for what this model does not have (400)."""


class UnsupportedEncoding(WrongContentType):
    """A Content-Encoding other than gzip or deflate (415)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RequestInput(_Strict):
    name: str
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Parameter] = {}
    data: list[Any] | None = None


class RequestOutput(_Strict):
    name: str
    parameters: dict[str, Parameter] = {}


class InferRequestHeader(_Strict):
    """``$inference_request`` (fields other than these, like Triton's ``model_name``, are ignored)."""

    id: str | None = None
    parameters: dict[str, Parameter] = {}
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class InferRequest:
    header: InferRequestHeader
    images: list[bytes]


@dataclass(frozen=True)
class OutputSpec:
    """One output to answer: its name, whether as binary data, and the classification count (0: the tensor)."""

    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # FP32, UINT8, INT32 or BYTES
    array: np.ndarray  # BYTES: an object array of bytes


# ---------------------------------------------------------------------------------------------------- requests


def header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a number (None: the whole body is JSON)."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise BadInferRequest(f"{HEADER_LENGTH} must be a whole number of bytes, got {value[:40]!r}")
    return int(value)


def decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """A gzip or deflate (zlib) request body, inflated to at most ``max_bytes`` (blocking)."""
    if encoding not in ENCODINGS:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not accepted; send identity, gzip or deflate")
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BadInferRequest(f"the body is not valid {encoding} data: {exc}") from None
    if len(data) > max_bytes:
        raise BodyTooLarge(max_bytes)
    if not inflater.eof or inflater.unused_data:
        raise BadInferRequest(f"the {encoding} body is truncated or has data after its end")
    return data


def parse_request(body: bytes, length: int | None, *, max_images: int) -> InferRequest:
    """The inference request in ``body``: its JSON header and the images of its one BYTES input (blocking)."""
    if length is None:
        text, binary = body, memoryview(b"")
    elif 0 < length <= len(body):
        text, binary = body[:length], memoryview(body)[length:]
    else:
        raise BadInferRequest(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
    header = _validate(text)
    tensor = _one_input(header)
    count = tensor.shape[0]
    if count > max_images:
        raise TooManyImages(max_images)
    if count == 0:
        raise BadInferRequest(f"input {INPUT!r} has shape [0]: send at least one image")
    if "shared_memory_region" in tensor.parameters:
        raise BadInferRequest("the shared memory extension is not supported: send the data in the body")
    if "binary_data_size" not in tensor.parameters:
        if len(binary):
            raise BadInferRequest(f"{len(binary)} bytes follow the JSON header, but no input has binary_data_size")
        return InferRequest(header, _json_images(tensor, count))
    size = tensor.parameters["binary_data_size"]
    if tensor.data is not None:
        raise BadInferRequest(f"input {INPUT!r} has both 'data' and binary_data_size: send one")
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise BadInferRequest(f"input {INPUT!r} declares binary_data_size {size!r}, but {len(binary)} bytes of "
                              f"binary data follow the JSON header ({HEADER_LENGTH}: {length})")
    return InferRequest(header, deserialize_bytes(binary, count))


def _validate(text: bytes | memoryview) -> InferRequestHeader:
    try:
        return InferRequestHeader.model_validate_json(bytes(text))
    except ValidationError as exc:
        problems: dict[str, str] = {}
        for error in exc.errors(include_url=False):
            loc, message = error["loc"], error["msg"]
            if loc and loc[-1] in _SCALAR_TAGS:  # one message per parameter, not one per member of the union
                loc, message = loc[:-1], "must be a string, number or boolean"
            problems.setdefault(".".join(str(p) for p in loc) or "body", message)
        listed = "; ".join(f"{where}: {message}" for where, message in list(problems.items())[:5])
        raise BadInferRequest(f"not an inference request: {listed}") from None


def _one_input(header: InferRequestHeader) -> RequestInput:
    if len(header.inputs) != 1:
        raise BadInferRequest(f"send exactly one input, {INPUT!r}; got {len(header.inputs)}")
    tensor = header.inputs[0]
    if tensor.name != INPUT:
        raise BadInferRequest(f"unknown input {tensor.name!r}; this model's input is {INPUT!r}")
    if tensor.datatype != "BYTES":
        raise BadInferRequest(f"input {INPUT!r} must be BYTES (encoded images), got {tensor.datatype!r}")
    if len(tensor.shape) != 1:
        raise BadInferRequest(f"input {INPUT!r} must have shape [N] (one encoded image each), got {tensor.shape}")
    return tensor


def _json_images(tensor: RequestInput, count: int) -> list[bytes]:
    """The JSON form: ``data`` is a flat list of ``count`` base64 strings (or ``data:`` URIs)."""
    data = tensor.data
    if data is None:
        raise BadInferRequest(f"input {INPUT!r} has no 'data' and no binary_data_size")
    if len(data) != count:
        raise BadInferRequest(f"input {INPUT!r} has shape [{count}] but its 'data' holds {len(data)} elements")
    return [_base64(element, i) for i, element in enumerate(data)]


def _base64(element: Any, index: int) -> bytes:
    if not isinstance(element, str):
        raise BadInferRequest(f"element {index} of {INPUT!r} is not a string: in JSON, each element is a base64 "
                              "encoded image (or send raw bytes with the binary data extension)")
    text = element
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadInferRequest(f"element {index} of {INPUT!r}: data: URIs must be base64 encoded")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInferRequest(f"element {index} of {INPUT!r} is not base64: in JSON, each element is a base64 "
                              "encoded image (or send raw bytes with the binary data extension)") from None


def deserialize_bytes(buffer: bytes | memoryview, count: int) -> list[bytes]:
    """A BYTES tensor in binary form: each element a 4-byte little-endian length, then that many bytes."""
    view, elements, offset = memoryview(buffer), [], 0
    while offset < len(view):
        if len(elements) == count:
            raise BadInferRequest(f"the binary data of {INPUT!r} holds more than the {count} elements of its shape")
        if offset + _LENGTH.size > len(view):
            raise BadInferRequest(f"the binary data of {INPUT!r} ends inside the length of element {len(elements)}")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if size > len(view) - offset:
            raise BadInferRequest(f"element {len(elements)} of {INPUT!r} declares {size} bytes; only "
                                  f"{len(view) - offset} remain")
        elements.append(bytes(view[offset:offset + size]))
        offset += size
    if len(elements) != count:
        raise BadInferRequest(f"input {INPUT!r} has shape [{count}] but its binary data holds {len(elements)} elements")
    return elements


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


# ---------------------------------------------------------------------------------------------------- outputs


def requested_outputs(header: InferRequestHeader, modules: Sequence[str], num_classes: int) -> list[OutputSpec]:
    """What to answer: the outputs named in the request (default: ``probabilities``) plus every attention module
    and ``input_box`` when the request parameter ``attention`` is true (and the model has attention); each as
    binary data when asked (``binary_data`` on the output, else the request's ``binary_data_output``)."""
    binary = _flag(header.parameters, "binary_data_output")
    named = header.outputs or [RequestOutput(name=PROBABILITIES)]
    known = [PROBABILITIES, *modules, INPUT_BOX]
    specs: list[OutputSpec] = []
    for output in named:
        if output.name not in known:
            raise BadInferRequest(f"unknown output {output.name!r}; this model's outputs: {', '.join(known)}")
        if any(spec.name == output.name for spec in specs):
            raise BadInferRequest(f"output {output.name!r} is requested twice")
        if "shared_memory_region" in output.parameters:
            raise BadInferRequest("the shared memory extension is not supported: outputs come in the body")
        count = _classification(output, num_classes)
        specs.append(OutputSpec(output.name, _flag(output.parameters, "binary_data", binary), count))
    if _flag(header.parameters, "attention") and modules:
        specs += [OutputSpec(m, binary) for m in (*modules, INPUT_BOX) if all(spec.name != m for spec in specs)]
    return specs


def _flag(parameters: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidParameter(f"parameter {name!r} must be true or false, got {value!r}")
    return value


def _classification(output: RequestOutput, num_classes: int) -> int:
    count = output.parameters.get("classification", 0)
    if count == 0:
        return 0
    if output.name != PROBABILITIES:
        raise BadInferRequest(f"classification applies to {PROBABILITIES!r} only, not {output.name!r}")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= num_classes:
        raise InvalidParameter(f"classification must be a whole number from 1 to {num_classes}, got {count!r}")
    return count


def output_tensors(specs: Sequence[OutputSpec], scores: np.ndarray, masks: Mapping[str, np.ndarray],
                   class_names: Sequence[str], boxes: np.ndarray) -> list[Tensor]:
    """``scores`` (N, C) float32, ``masks`` {module: (N, h, w) uint8} and ``boxes`` (N, 4) as the requested
    tensors."""
    tensors = []
    for spec in specs:
        if spec.name == INPUT_BOX:
            tensors.append(Tensor(spec.name, "INT32", np.ascontiguousarray(boxes, dtype="<i4")))
        elif spec.name != PROBABILITIES:
            tensors.append(Tensor(spec.name, "UINT8", np.ascontiguousarray(masks[spec.name], dtype=np.uint8)))
        elif spec.classification:
            tensors.append(Tensor(spec.name, "BYTES", classifications(scores, class_names, spec.classification)))
        else:
            tensors.append(Tensor(spec.name, "FP32", np.ascontiguousarray(scores, dtype="<f4")))
    return tensors


def classifications(scores: np.ndarray, class_names: Sequence[str], count: int) -> np.ndarray:
    """The classification extension: (N, count) ``"<score>:<index>:<label>"``, highest score first."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :count]
    rows = [[f"{scores[n, i]:g}:{i}:{class_names[i]}".encode() for i in row] for n, row in enumerate(order)]
    array = np.empty((len(rows), count), dtype=object)
    array[:] = rows
    return array


def encode_response(tensors: Sequence[Tensor], specs: Sequence[OutputSpec], header: Mapping[str, Any]) -> \
        tuple[bytes, int | None]:
    """The answer body and, when any output is binary, the length of its JSON header (blocking)."""
    outputs, chunks = [], []
    for tensor, spec in zip(tensors, specs, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.array.shape)}
        if spec.binary:
            chunk = _binary(tensor)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = _json_data(tensor)
        outputs.append(entry)
    text = json.dumps({**header, "outputs": outputs}, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


def _binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.array.ravel().tolist())
    return tensor.array.tobytes()  # C order, little-endian ('<f4', '<i4', uint8)


def _json_data(tensor: Tensor) -> list[Any]:
    if tensor.datatype == "BYTES":
        return [element.decode() for element in tensor.array.ravel()]
    return tensor.array.ravel().tolist()
