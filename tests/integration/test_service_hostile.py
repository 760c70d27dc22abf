"""Hostile requests: each gets the right 4xx with {"detail", "code"}, and the server still serves after."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from service_testing import image_bytes, metric_samples, noise_image, serving

pytestmark = pytest.mark.anyio
BODY_LIMIT = 200_000


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """Only a PNG header claiming 400 MP (plus a token IDAT): built in microseconds, never decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def multipage_tiff() -> bytes:
    buf = io.BytesIO()
    pages = [noise_image(i) for i in range(2)]
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def animated_gif() -> bytes:
    buf = io.BytesIO()
    frames = [noise_image(i).convert("P") for i in range(3)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n"
PART_HEAD = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
JPEG = image_bytes(noise_image(0, 64), "JPEG")


def chunks(total: int, size: int = 65536, prefix: bytes = b""):
    """A streamed body without Content-Length (httpx sends it chunked)."""
    async def gen():
        yield prefix
        sent = 0
        while sent < total:
            yield b"\0" * min(size, total - sent)
            sent += size
    return gen()


def raw(body, content_type: str = "image/png") -> dict:
    return {"content": body, "headers": {"Content-Type": content_type}}


def form(blob: bytes, name: str = "file") -> dict:
    return {"files": [(name, ("x.bin", blob, "application/octet-stream"))]}


CASES = {
    # name: (url, request kwargs, status, code)
    "empty body": ("/v1/predict", raw(b""), 400, "bad_request"),
    "empty multipart part": ("/v1/predict", form(b""), 400, "bad_request"),
    "no file part": ("/v1/predict", form(JPEG, name="image"), 400, "bad_request"),
    "random bytes": ("/v1/predict", raw(np.random.default_rng(1).bytes(5000)), 422, "undecodable_image"),
    "truncated jpeg": ("/v1/predict", raw(JPEG[: len(JPEG) // 2], "image/jpeg"), 422, "undecodable_image"),
    "20000x20000 png bomb": ("/v1/predict", form(png_bomb()), 413, "image_too_large"),
    "animated gif": ("/v1/predict", form(animated_gif()), 415, "unsupported_media_type"),
    "gif content type": ("/v1/predict", raw(animated_gif(), "image/gif"), 415, "unsupported_media_type"),
    "multipage tiff": ("/v1/predict", form(multipage_tiff()), 415, "unsupported_media_type"),
    "eps": ("/v1/predict", form(EPS), 415, "unsupported_media_type"),
    "text body": ("/v1/predict", raw(b"hello", "text/plain"), 415, "unsupported_media_type"),
    "oversize body": ("/v1/predict", raw(b"\0" * (BODY_LIMIT + 1)), 413, "body_too_large"),
    "chunked oversize body": ("/v1/predict", raw(chunks(BODY_LIMIT * 3)), 413, "body_too_large"),
    "chunked oversize multipart": ("/v1/predict", {"content": chunks(BODY_LIMIT * 3, prefix=PART_HEAD), "headers": {
        "Content-Type": "multipart/form-data; boundary=xyz"}}, 413, "body_too_large"),
    "many form fields, no file": ("/v1/predict", raw(b"".join(
        b'--xyz\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(30)) + b"--xyz--\r\n",
        "multipart/form-data; boundary=xyz"), 400, "bad_request"),
    "malformed multipart": ("/v1/predict", raw(b"--xyz\r\ngarbage", "multipart/form-data; boundary=xyz"), 400,
                            "bad_request"),
    "invalid base64": ("/v1/predict", {"json": {"images": ["@@not-base64@@"]}}, 400, "bad_request"),
    "base64 of junk": ("/v1/predict", {"json": {"images": [base64.b64encode(b"junk").decode()]}}, 422,
                       "undecodable_image"),
    "json without images": ("/v1/predict", {"json": {"image": "x"}}, 400, "bad_request"),
    "invalid json": ("/v1/predict", raw(b"{nope", "application/json"), 400, "bad_request"),
    "too many images": ("/v1/predict", {"json": {"images": [base64.b64encode(JPEG).decode()] * 5}}, 413,
                        "body_too_large"),
    "unknown model": ("/v1/models/nope/predict", raw(JPEG, "image/jpeg"), 404, "model_not_found"),
    "top_k zero": ("/v1/predict?top_k=0", raw(JPEG, "image/jpeg"), 422, "invalid_parameter"),
    "top_k above classes": ("/v1/predict?top_k=11", raw(JPEG, "image/jpeg"), 422, "invalid_parameter"),
    "top_k not a number": ("/v1/predict?top_k=five", raw(JPEG, "image/jpeg"), 422, "invalid_parameter"),
    "bad content-length": ("/v1/predict", {"content": JPEG, "headers": {"Content-Type": "image/jpeg",
                                                                        "Content-Length": "12abc"}}, 400,
                           "bad_request"),
}


async def test_hostile_inputs_get_the_right_4xx_and_the_server_stays_healthy(model_dir, tmp_path):
    good = image_bytes(Image.new("L", (8, 8), 128))
    async with serving(model_dir, tmp_path, max_body_bytes=BODY_LIMIT, max_images_per_request=4) as (app, client):
        failures = []
        for name, (url, kwargs, status, code) in CASES.items():
            resp = await client.post(url, **kwargs)
            body = resp.json()
            if (resp.status_code, body.get("code")) != (status, code) or not isinstance(body.get("detail"), str):
                failures.append(f"{name}: got {resp.status_code} {body}, want {status} {code}")
        assert not failures, "\n".join(failures)
        after = await client.post("/v1/predict", content=good, headers={"Content-Type": "image/png"})
        assert after.status_code == 200 and (await client.get("/readyz")).status_code == 200
        text = (await client.get("/metrics")).text
    rejections = {dict(k)["reason"]: v for k, v in metric_samples(text, "macula_rejections_total").items()}
    assert rejections["too_large"] >= 5 and rejections["unsupported_format"] >= 5 and rejections["bad_input"] >= 10
    assert metric_samples(text, "macula_images_total") == {(("model", "gray"),): 1.0}  # nothing bad reached a batch
