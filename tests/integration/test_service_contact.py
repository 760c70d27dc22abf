"""What a new user meets first: self-hosted API docs, strict query parameters, one status per condition whatever
the encoding, and TorchServe's own documented curl calls running unchanged."""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import shutil
import subprocess

import pytest
from PIL import Image
from service_testing import image_bytes, live_server, noise_image, serving
from skimage import data

pytestmark = pytest.mark.anyio


PNG = image_bytes(Image.new("L", (8, 8), 128))


# ---------------------------------------------------------------------------------------------- API docs

def asset_urls(html: str) -> list[str]:
    """Every script, stylesheet and icon URL an HTML page names."""
    return re.findall(r'<(?:script|link)\b[^>]*?\b(?:src|href)="([^"]+)"', html)


async def test_docs_pages_load_every_asset_from_the_app_itself(model_dir, tmp_path):
    async with serving(model_dir, tmp_path, api_key="k3y") as (app, client):
        for page in ("/docs", "/redoc"):
            resp = await client.get(page)
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html"), page
            urls = asset_urls(resp.text)
            assert any(u.endswith(".js") for u in urls), (page, urls)
            assert "googleapis" not in resp.text and "cdn" not in resp.text.lower(), page
            for url in urls:
                assert url.startswith("/"), f"{page} loads {url} from another host"
                asset = await client.get(url)
                assert asset.status_code == 200 and len(asset.content) > 1000, (page, url, asset.status_code)
            assert (await client.get("/openapi.json")).status_code == 200
        js = await client.get("/docs-assets/swagger-ui-bundle.js")
        assert "javascript" in js.headers["content-type"]


# ---------------------------------------------------------------------------------------------- query parameters

@pytest.mark.parametrize(("query", "names"), [
    ("topk=3", "topk"), ("top_k=3.0", "top_k"), ("top_k=+3", "top_k"), ("top_k=3&top_k=4", "top_k"),
    ("top_k=3&atention=true", "atention"), ("top_k=", "top_k"), ("top_k=3_000", "top_k"),
])
async def test_predict_refuses_unknown_or_non_integer_parameters_by_name(model_dir, tmp_path, query, names):
    async with serving(model_dir, tmp_path) as (app, client):
        for url in ("/v1/predict", "/v1/models/gray/predict"):
            resp = await client.post(f"{url}?{query}", content=PNG, headers={"Content-Type": "image/png"})
            assert resp.status_code == 422, (url, query, resp.text)
            assert resp.json()["code"] == "invalid_parameter" and names in resp.json()["detail"], resp.json()
        ok = await client.post("/v1/predict?top_k=3&attention=false&attention_size=feature", content=PNG,
                               headers={"Content-Type": "image/png"})
        assert ok.status_code == 200 and len(ok.json()["predictions"][0]["top_k"]) == 3


# ---------------------------------------------------------------------------------------------- one status each

def svg() -> bytes:
    return b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect/></svg>'


def pillow(fmt: str) -> bytes:
    buf = io.BytesIO()
    noise_image(1, 16).save(buf, format=fmt)
    return buf.getvalue()


REFUSED_FORMATS = {"SVG": svg(), "GIF": pillow("GIF"), "BMP": pillow("BMP"), "TIFF": pillow("TIFF"),
                   "PDF": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"}


def encodings(blob: bytes, declared: str) -> dict[str, dict]:
    return {
        "raw, its own type": {"content": blob, "headers": {"Content-Type": declared}},
        "raw, claimed png": {"content": blob, "headers": {"Content-Type": "image/png"}},
        "multipart": {"files": [("file", ("x", blob, declared))]},
        "multipart, octet-stream": {"files": [("file", ("x", blob, "application/octet-stream"))]},
        "json base64": {"json": {"images": [base64.b64encode(blob).decode()]}},
        "json data uri": {"json": {"images": [f"data:{declared};base64," + base64.b64encode(blob).decode()]}},
    }


async def test_a_refused_format_is_415_whatever_the_encoding(model_dir, tmp_path):
    types = {"SVG": "image/svg+xml", "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff",
             "PDF": "application/pdf"}
    failures = []
    async with serving(model_dir, tmp_path) as (app, client):
        for fmt, blob in REFUSED_FORMATS.items():
            for encoding, kwargs in encodings(blob, types[fmt]).items():
                resp = await client.post("/v1/predict", **kwargs)
                if (resp.status_code, resp.json().get("code")) != (415, "unsupported_media_type"):
                    failures.append(f"{fmt} as {encoding}: {resp.status_code} {resp.text}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("count", [65, 100, 1000])
async def test_too_many_images_is_413_whatever_the_encoding(model_dir, tmp_path, count):
    async with serving(model_dir, tmp_path) as (app, client):  # default limit: 64 images
        forms = {
            "multipart": {"files": [("file", (f"{i}.png", PNG, "image/png")) for i in range(count)]},
            "json": {"json": {"images": [base64.b64encode(PNG).decode()] * count}},
        }
        for encoding, kwargs in forms.items():
            resp = await client.post("/v1/predict", **kwargs)
            assert resp.status_code == 413, (encoding, count, resp.text)
            assert resp.json()["code"] == "body_too_large" and "64" in resp.json()["detail"]
        torchserve = await client.post("/predictions/gray", files=[("data", ("x.png", PNG, "image/png"))] * count)
        assert torchserve.status_code == 413
        exactly = await client.post("/v1/predict", files=[("file", (f"{i}.png", PNG, "image/png")) for i in range(64)])
        assert exactly.status_code == 200 and len(exactly.json()["predictions"]) == 64


# ---------------------------------------------------------------------------------------------- TorchServe's curl

# The calls exactly as TorchServe's inference API docs write them (docs/inference_api.md): HOST, NAME and the file
# names are the only substitutions. `-T` makes curl send a PUT with no Content-Type.
TORCHSERVE_DOC_CALLS = [
    "curl http://HOST/predictions/NAME -T kitten_small.jpg",
    'curl http://HOST/predictions/NAME -F "data=@kitten_small.jpg"',
    "curl http://HOST/predictions/NAME -F 'data=@dogs-before.jpg' -F 'data=@kitten_small.jpg'",
    "curl -X POST http://HOST/predictions/NAME -T kitten_small.jpg",
    "curl http://HOST/explanations/NAME -T 0.png",
]


def test_torchserve_documented_curl_calls_run_unchanged(model_dir, tmp_path):
    curl = shutil.which("curl")
    assert curl, "curl missing (Debian package curl)"
    Image.fromarray(data.chelsea()).save(tmp_path / "kitten_small.jpg")
    Image.fromarray(data.coffee()).save(tmp_path / "dogs-before.jpg")
    Image.fromarray(data.camera()[::8, ::8]).save(tmp_path / "0.png")
    with live_server(model_dir, tmp_path) as base:
        answers = []
        for call in TORCHSERVE_DOC_CALLS:
            argv = shlex.split(call.replace("HOST", base.removeprefix("http://")).replace("NAME", "gray"))
            done = subprocess.run([*argv, "-sS", "-w", "\n%{http_code}"], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=60)
            body, _, status = done.stdout.rpartition("\n")
            assert done.returncode == 0 and status == "200", (call, done.stdout, done.stderr)
            answers.append(json.loads(body))
    single, form, pair, posted, explained = answers
    assert len(single) == 5 and all(label.startswith("class_") for label in single)
    assert form == single and posted == single
    assert isinstance(pair, list) and len(pair) == 2 and pair[1] == single
    assert [e["module"] for e in explained] == [f"layer{s}.{b}.cbam" for s in (1, 2, 3) for b in range(3)]


async def test_torchserve_routes_sniff_untyped_and_octet_stream_bodies(model_dir, tmp_path):
    jpeg = image_bytes(noise_image(3, 40), "JPEG")
    async with serving(model_dir, tmp_path) as (app, client):
        typed = await client.post("/predictions/gray", content=jpeg, headers={"Content-Type": "image/jpeg"})
        for method in ("POST", "PUT"):
            for headers in ({}, {"Content-Type": "application/octet-stream"}):
                resp = await client.request(method, "/predictions/gray", content=jpeg, headers=headers)
                assert resp.status_code == 200 and resp.json() == typed.json(), (method, headers, resp.text)
        refused = await client.put("/predictions/gray", content=svg())
        assert refused.status_code == 415 and refused.json()["code"] == "unsupported_media_type"
        junk = await client.put("/predictions/gray", content=b"not an image at all")
        assert junk.status_code == 422 and junk.json()["code"] == "undecodable_image"
        ours = await client.post("/v1/predict", content=jpeg)  # our own routes still want a Content-Type
        assert ours.status_code == 415
