"""The audit routes through the app: search, export, kept inputs and their errors (SQLite); two app instances on
one PostgreSQL database (predict on one, read on the other)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.integration.service_testing import image_bytes, model_dir_with, noise_image, serving

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gray_checkpoint, rgb_checkpoint):
    return model_dir_with(tmp_path_factory.mktemp("models"), gray=gray_checkpoint, rgb=rgb_checkpoint)


def exif_rotated_jpeg(width: int = 800, height: int = 400) -> bytes:
    """A JPEG stored wide, with a blue band on its stored left edge, whose EXIF says: rotate 90° clockwise."""
    img = Image.new("RGB", (width, height), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, width // 4, height))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


async def predict(client, model: str, *blobs: bytes, attention: bool = False) -> dict:
    files = [("file", (f"x{i}", blob, "image/jpeg" if blob[:2] == b"\xff\xd8" else "image/png"))
             for i, blob in enumerate(blobs)]
    resp = await client.post(f"/v1/models/{model}/predict", files=files,
                             params={"attention": str(attention).lower()})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_search_export_and_kept_images(model_dir, tmp_path):
    photo = exif_rotated_jpeg()
    async with serving(model_dir, tmp_path) as (app, client):
        first = await predict(client, "rgb", photo, attention=True)
        second = await predict(client, "gray", image_bytes(noise_image(1)))
        third = await predict(client, "rgb", image_bytes(noise_image(2)), image_bytes(noise_image(3)))
        app.state.service.audit.flush(5)

        page = (await client.get("/v1/predictions")).json()
        assert [item["id"] for item in page["items"]] == [third["id"], second["id"], first["id"]]
        assert page["next_cursor"] is None
        newest = page["items"][0]
        assert newest["model"] == third["model"] and newest["route"] == "/v1/models/{name}/predict"
        assert newest["image_count"] == 2 and newest["masks_kept"] is False
        assert [(i["label"], i["score"]) for i in newest["images"]] == [
            (p["top_k"][0]["label"], p["top_k"][0]["score"]) for p in third["predictions"]]
        assert page["items"][2]["masks_kept"] is True and page["items"][2]["images"][0]["input_kept"] is True

        by_model = (await client.get("/v1/predictions", params={"model": "gray"})).json()
        assert [item["id"] for item in by_model["items"]] == [second["id"]]
        top = first["predictions"][0]["top_k"][0]
        by_label = (await client.get("/v1/predictions", params={
            "model": "rgb", "label": top["label"], "min_score": top["score"], "max_score": top["score"]})).json()
        assert first["id"] in [item["id"] for item in by_label["items"]]
        paged = (await client.get("/v1/predictions", params={"limit": 2})).json()
        rest = (await client.get("/v1/predictions", params={"limit": 2, "cursor": paged["next_cursor"]})).json()
        assert [i["id"] for i in paged["items"] + rest["items"]] == [i["id"] for i in page["items"]]
        assert rest["next_cursor"] is None

        jsonl = await client.get("/v1/predictions/export", params={"format": "jsonl"})
        assert jsonl.headers["content-type"].startswith("application/x-ndjson")
        assert [json.loads(line) for line in jsonl.text.splitlines()] == page["items"]
        table = await client.get("/v1/predictions/export", params={"format": "csv", "model": "rgb"})
        rows = list(csv.DictReader(io.StringIO(table.text)))
        assert [(r["id"], r["image"]) for r in rows] == [(third["id"], "0"), (third["id"], "1"), (first["id"], "0")]
        assert float(rows[2]["score"]) == top["score"] and rows[2]["masks_kept"] == "true"

        image = await client.get(f"/v1/predictions/{first['id']}/images/0")
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(image.content))
        assert thumb.size == (128, 256)   # EXIF-rotated: the 800×400 photo stands upright, longest side 256
        assert np.asarray(thumb)[:20].mean(axis=(0, 1))[2] > 150   # the stored left band is now on top
        record = (await client.get(f"/v1/predictions/{first['id']}")).json()
        assert record["images"][0]["input"]["kept"] == "thumbnail"
        assert [a["module"] for a in record["images"][0]["attention"]] == [
            a["module"] for a in first["predictions"][0]["attention"]]
        missing = await client.get(f"/v1/predictions/{first['id']}/images/1")
        assert missing.status_code == 404 and missing.json()["code"] == "image_not_found"
        nobody = await client.get(f"/v1/predictions/{'0' * 32}/images/0")
        assert nobody.status_code == 404 and nobody.json()["code"] == "prediction_not_found"
        for n in ("-1", "884370753790986205225903982976696320"):  # the second was a 500 (SQLite integer overflow)
            bad = await client.get(f"/v1/predictions/{first['id']}/images/{n}")
            assert bad.status_code == 422 and bad.json()["code"] == "invalid_parameter", bad.text


@pytest.mark.parametrize("params", [{"lable": "cat"}, {"cursor": "not-ours"}, {"since": "yesterday"},
                                    {"limit": "0"}, {"limit": "501"}, {"min_score": "nan"},
                                    {"model": ["a", "b"]}])
async def test_bad_search_parameters_are_422(model_dir, tmp_path, params):
    async with serving(model_dir, tmp_path, audit_db=":memory:") as (app, client):
        resp = await client.get("/v1/predictions", params=params)
        export = await client.get("/v1/predictions/export", params={"format": "xml"})
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_parameter", resp.text
    assert export.status_code == 422 and export.json()["code"] == "invalid_parameter"


@pytest.mark.parametrize("value", ["yes", "1", "", "null", ["true", "false"]])
async def test_familiar_other_than_true_or_false_is_422_naming_it(model_dir, tmp_path, value):
    async with serving(model_dir, tmp_path, audit_db=":memory:") as (app, client):
        answers = [await client.get(path, params={"familiar": value})
                   for path in ("/v1/predictions", "/v1/predictions/export")]
        fine = await client.get("/v1/predictions", params={"familiar": "false"})
    for resp in answers:
        assert resp.status_code == 422, resp.text
        assert set(resp.json()) == {"detail", "code"} and resp.json()["code"] == "invalid_parameter"
        assert "'familiar'" in resp.json()["detail"] or "familiar must be true or false" in resp.json()["detail"]
    assert fine.status_code == 200 and fine.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("mode", ["original", "none"])
async def test_inputs_setting_keeps_the_original_or_nothing(model_dir, tmp_path, mode):
    blob = image_bytes(noise_image(4))
    async with serving(model_dir, tmp_path, audit_inputs=mode) as (app, client):
        made = await predict(client, "rgb", blob)
        app.state.service.audit.flush(5)
        image = await client.get(f"/v1/predictions/{made['id']}/images/0")
        summary = (await client.get("/v1/predictions")).json()["items"][0]
    if mode == "original":
        assert image.status_code == 200 and image.content == blob and image.headers["content-type"] == "image/png"
        assert summary["images"][0]["input_kept"] is True
    else:
        assert image.status_code == 404 and image.json()["code"] == "image_not_found"
        assert summary["images"][0]["input_kept"] is False


async def test_two_instances_share_one_postgresql(model_dir, tmp_path, request):
    """Predict on one instance, read everything back on the other: no lookup depends on the replica."""
    url = request.getfixturevalue("pg_url")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with serving(model_dir, tmp_path / "a", audit_url=url, audit_durable=True) as (_, one), \
            serving(model_dir, tmp_path / "b", audit_url=url) as (_, other):
        made = [await predict(one, "rgb", exif_rotated_jpeg(), attention=True),
                await predict(one, "gray", image_bytes(noise_image(5)), image_bytes(noise_image(6)))]
        # durable: committed before the 200, so the other instance sees it at once
        for response in made:
            record = (await other.get(f"/v1/predictions/{response['id']}")).json()
            assert record["id"] == response["id"] and record["model"]["name"] == response["model"]["name"]
            assert [i["top_k"] for i in record["images"]] == [p["top_k"] for p in response["predictions"]]
        assert record["images"][1]["input"]["kept"] == "thumbnail"
        page = (await other.get("/v1/predictions")).json()
        assert [item["id"] for item in page["items"]] == [made[1]["id"], made[0]["id"]]
        exported = (await other.get("/v1/predictions/export", params={"model": "gray"})).text.splitlines()
        assert [json.loads(line)["id"] for line in exported] == [made[1]["id"]]
        image = await other.get(f"/v1/predictions/{made[0]['id']}/images/0")
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (128, 256)
        metrics = (await one.get("/metrics")).text
    assert 'macula_audit_write_duration_seconds_count{backend="postgresql"}' in metrics
