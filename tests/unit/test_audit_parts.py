"""The audit package's pure parts: time and flag parsing, cursors, filters, store URLs, records → rows and masks,
kept-input thumbnails."""

from __future__ import annotations

import base64
import io
import math
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from service.audit import InvalidQuery, KeptInput, keep_input, mask_modules, mask_png, open_backend, thumbnail
from service.audit.inputs import media_type
from service.audit.query import Filters, check_limit, decode_cursor, encode_cursor, page_sql, parse_bool, parse_time
from service.audit.records import encode
from service.audit.sqlite import MEMORY, SqliteBackend


@pytest.mark.parametrize(("text", "expected"), [
    ("1764064800", 1764064800.0),
    ("1764064800.25", 1764064800.25),
    ("2025-11-25T10:00:00Z", datetime(2025, 11, 25, 10, tzinfo=UTC).timestamp()),
    ("2025-11-25T10:00:00+02:00", datetime(2025, 11, 25, 8, tzinfo=UTC).timestamp()),
    ("2025-11-25T10:00:00", datetime(2025, 11, 25, 10, tzinfo=UTC).timestamp()),   # no zone: UTC
    ("2025-11-25", datetime(2025, 11, 25, tzinfo=UTC).timestamp()),
])
def test_times_are_iso_8601_or_epoch_seconds(text, expected):
    assert parse_time(text, "since") == expected


@pytest.mark.parametrize("text", ["yesterday", "nan", "inf", "2025-13-01", ""])
def test_bad_times_are_invalid_queries(text):
    with pytest.raises(InvalidQuery, match="since"):
        parse_time(text, "since")


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("TRUE", True), ("False", False)])
def test_flags_are_true_or_false(text, expected):
    assert parse_bool(text, "familiar") is expected


@pytest.mark.parametrize("text", ["", "1", "0", "yes", "no", "on", "null", "truee", "x" * 500])
def test_other_flag_values_are_invalid_queries_naming_the_parameter(text):
    with pytest.raises(InvalidQuery, match="familiar must be true or false") as raised:
        parse_bool(text, "familiar")
    assert len(str(raised.value)) < 120   # a long value is cut, not echoed whole


def test_cursor_round_trips_the_key_exactly():
    key = (1764064800.123456789, "3f2b0c8e9a7d4c1e8b6a5d4c3b2a1f0e")
    cursor = encode_cursor(*key)
    assert decode_cursor(cursor) == key
    assert all(c.isalnum() or c in "-_" for c in cursor)   # URL-safe, no padding


@pytest.mark.parametrize("cursor", ["", "!!!", base64.urlsafe_b64encode(b"[1, 2]").decode(),
                                    base64.urlsafe_b64encode(b'{"a": 1}').decode(),
                                    base64.urlsafe_b64encode(b'[true, "x"]').decode()])
def test_foreign_cursors_are_invalid_queries(cursor):
    with pytest.raises(InvalidQuery, match="cursor"):
        decode_cursor(cursor)


def test_limits_and_scores_are_checked():
    assert check_limit(500) == 500
    for limit in (0, 501):
        with pytest.raises(InvalidQuery):
            check_limit(limit)
    with pytest.raises(InvalidQuery):
        Filters(min_score=math.nan)


def test_image_filters_search_the_image_rows_and_others_the_predictions():
    sql, params = page_sql(Filters(model="demo", label="7", max_score=0.5), (10.0, "abc"), 51)
    assert "FROM prediction_images" in sql and sql.startswith("SELECT DISTINCT")
    assert params == ["demo", "7", 0.5, 10.0, "abc", 51]
    sql, params = page_sql(Filters(version="v1", since=5.0, until=9.0), None, 11)
    assert "FROM predictions " in sql and "DISTINCT" not in sql
    assert params == ["v1", 5.0, 9.0, 11]
    assert sql.endswith("ORDER BY created_at DESC, id DESC LIMIT ?")
    sql, params = page_sql(Filters(familiar=False, label="7"), None, 11)
    assert "FROM prediction_images" in sql and "familiar = ?" in sql and "label = ?" in sql
    assert params == ["7", False, 11]
    assert Filters(familiar=True).image_level and not Filters(model="demo").image_level


def test_store_urls_name_their_backend(tmp_path):
    assert open_backend("") is None
    memory = open_backend("sqlite:///:memory:")
    assert isinstance(memory, SqliteBackend) and memory.path == MEMORY
    assert open_backend("sqlite:///audit.db").path == "audit.db"
    assert open_backend("sqlite:////data/audit.db").path == "/data/audit.db"
    assert open_backend(str(tmp_path / "a.db")).path == str(tmp_path / "a.db")   # MACULA_AUDIT_DB as before
    assert open_backend("postgresql://u:secret@db:5432/macula").name == "postgresql"
    assert "secret" not in repr(open_backend("postgres://u:secret@db/macula"))
    with pytest.raises(ValueError, match="mysql"):
        open_backend("mysql://u@h/db")


def record_with_masks() -> dict:
    mask = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16, mode="L")
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    return {"id": "abc", "created_at": 5.0, "model": {"name": "demo", "version": "v"}, "route": "/v1/predict",
            "images": [{"top_k": [{"index": 2, "label": "cat", "score": 0.25}, {"index": 1, "label": "dog",
                                                                              "score": 0.2}],
                        "attention": [{"module": "layer1.0.cbam", "png": png, "height": 4, "width": 4},
                                      {"module": "layer2.0.cbam", "png": png, "height": 4, "width": 4,
                                       "original": {"png": png, "height": 4, "width": 4}}]},
                       {"top_k": []}]}


def test_encoding_takes_each_images_top1_and_counts_bytes():
    record = record_with_masks()
    kept = KeptInput("image/jpeg", b"x" * 100)
    row = encode(record, [kept, None], now=99.0)
    assert (row.id, row.created_at, row.model_name, row.masks_kept) == ("abc", 5.0, "demo", True)
    assert [(i.n, i.label, i.score) for i in row.images] == [(0, "cat", 0.25), (1, None, None)]
    assert row.nbytes == len(row.record_json) + 100
    assert row.input_rows() == [("abc", 0, "thumbnail", "image/jpeg", kept.data)]
    assert '"input":{"kept":"thumbnail"' in row.record_json
    assert "input" not in record["images"][0]   # the caller's record is not changed


def test_encoding_keeps_each_images_familiar_flag_and_none_without_one():
    record = record_with_masks()
    record["images"][0] |= {"familiar": False, "familiarity": 0.01}
    record["images"].append({"top_k": [], "familiar": "no"})   # not a bool: no flag rather than a wrong one
    row = encode(record, (), now=0.0)
    assert [i.familiar for i in row.images] == [False, None, None]
    assert [r[-1] for r in row.image_rows()] == [False, None, None]
    record["images"][1]["familiar"] = True
    assert [i.familiar for i in encode(record, (), now=0.0).images] == [False, True, None]


def test_masks_are_retrievable_by_image_and_module():
    record = record_with_masks()
    assert mask_modules(record, 0) == ["layer1.0.cbam", "layer2.0.cbam"] and mask_modules(record, 1) == []
    png = mask_png(record, 0, "layer2.0.cbam")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.arange(16).reshape(4, 4) * 16)
    assert mask_png(record, 0, "layer2.0.cbam", size="original") == png
    assert mask_png(record, 0, "layer1.0.cbam", size="original") is None
    assert mask_png(record, 0, "nope") is None and mask_png(record, 5, "layer1.0.cbam") is None


def exif_rotated_jpeg(width: int, height: int, orientation: int) -> bytes:
    """A JPEG stored ``width``×``height`` whose EXIF says to rotate it (6: 90° clockwise)."""
    img = Image.new("RGB", (width, height), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, width // 4, height))   # a blue band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_thumbnail_is_the_decoded_rotated_image_with_longest_side_256():
    from models import Preprocessing
    from service.codec import decode

    data = exif_rotated_jpeg(800, 400, orientation=6)  # a 32-px model: decoded at 1/2, the floor of 256 px
    pre = Preprocessing(input_size=(32, 32), resize_mode="stretch", resize_size=32, mean=(0.5,) * 3,
                        std=(0.25,) * 3, color="RGB")
    decoded, _ = decode(data, max_pixels=10**8, pre=pre)
    kept = thumbnail(decoded)
    assert kept.media_type == "image/jpeg" and kept.kind == "thumbnail"
    small = Image.open(io.BytesIO(kept.data))
    assert small.format == "JPEG" and max(small.size) == 256
    assert not small.getexif() and "icc_profile" not in small.info   # no metadata of the client's file
    assert small.size[1] > small.size[0]   # rotated: the 800-wide photo stands upright
    top = np.asarray(small.convert("RGB"))[:10].mean(axis=(0, 1))
    assert top[2] > 150 and top[0] < 100     # the stored left band is now on top (90° clockwise)


def test_thumbnail_never_enlarges_and_keeps_greyscale():
    kept = thumbnail(Image.new("L", (40, 20), 128))
    small = Image.open(io.BytesIO(kept.data))
    assert small.size == (40, 20) and small.mode == "L"
    rgba = Image.open(io.BytesIO(thumbnail(Image.new("RGBA", (300, 600))).data))
    assert rgba.mode == "RGB" and rgba.size == (128, 256)


def test_input_modes():
    img = Image.new("RGB", (10, 10))
    png = b"\x89PNG\r\n\x1a\n rest"
    assert keep_input("none", img, png) is None
    assert keep_input("original", img, png) == KeptInput("image/png", png, "original")
    assert keep_input("thumbnail", img, png).media_type == "image/jpeg"
    assert media_type(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp" and media_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    with pytest.raises(ValueError):
        keep_input("everything", img, png)
