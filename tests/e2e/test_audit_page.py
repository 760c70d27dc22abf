"""The auditor's page (/audit/) and /docs in a real browser (Debian's chromium, headless, via Playwright)
against ``python -m service`` as a real process, with an API key set. Every page opened here fails its test if
it makes a request outside the app (see conftest.py)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from service.overlay import COLORMAPS, colormap_table
from tests.conftest import make_checkpoint
from tests.e2e.browser import running_service

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
API_KEY = "audit-page-test-key"
PAGE_FILES = {"": "text/html", "app.js": "javascript", "api.js": "javascript", "detail.js": "javascript",
              "overlay.js": "javascript", "app.css": "text/css"}


def two_tone_png(width: int = 96, height: int = 64) -> bytes:
    """Left half bright yellow, right half dark blue: tells where the picture is, in colour or grey."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (240, 200, 40)
    pixels[:, width // 2:] = (20, 40, 160)
    pixels[height // 4: height // 2, width // 8: width // 4] = (255, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def service_url(tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("audit-page")
    model_dir = workdir / "models"
    model_dir.mkdir()
    make_checkpoint(model_dir / "demo.safetensors")  # resnet20 + CBAM: nine attention modules
    with running_service(model_dir, workdir, "--audit-db", str(workdir / "audit.db"),
                         env={"MACULA_API_KEY": API_KEY}) as base:
        yield base


def authed(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30)


def answer_key_prompts(page, key: str = API_KEY) -> list[int]:
    """Type ``key`` into the page's key dialog whenever it opens; returns the list that counts the prompts."""
    prompts: list[int] = []

    def answer(dialog) -> None:
        prompts.append(1)
        dialog.get_by_label("Key").fill(key)
        dialog.get_by_role("button", name="Use this key").click()

    page.add_locator_handler(page.locator("#key-dialog[open]"), answer)
    return prompts


def canvas_pixels(page, selector: str) -> np.ndarray:
    """The RGBA pixels of a canvas on the page, read in the page (no request)."""
    width, height, data = page.locator(selector).evaluate(
        "c => [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]")
    return np.asarray(data, np.uint8).reshape(height, width, 4)


def test_page_and_its_files_are_served_by_the_app_without_the_key_and_pinned_to_its_origin(service_url):
    with httpx.Client(base_url=service_url, timeout=30) as client:
        redirect = client.get("/audit")
        assert redirect.status_code == 308 and redirect.headers["location"].endswith("audit/")
        for name, content_type in PAGE_FILES.items():
            response = client.get(f"/audit/{name}")
            assert response.status_code == 200, name
            assert content_type in response.headers["content-type"], name
            policy = response.headers["content-security-policy"]
            assert "default-src 'self'" in policy and "connect-src 'self'" in policy
            assert "http" not in response.text.replace("http_error", ""), f"{name} names an outside address"
        tables = client.get("/audit/colormaps.json").json()
        assert tables["default"] in COLORMAPS
        for name in COLORMAPS:
            assert np.array_equal(np.asarray(tables["colormaps"][name]), colormap_table(name)), name
        assert client.get("/v1/models").status_code == 401   # the page is open; the data behind it is not
        assert client.get("/audit/no-such-file.js").status_code == 404


def test_upload_from_the_page_opens_its_detail_view_with_an_overlay_per_module(service_url, open_page, screenshot):
    page, guard = open_page(service_url)
    prompts = answer_key_prompts(page)
    page.goto("/audit/")
    page.get_by_label("Classify an image").set_input_files(
        {"name": "two-tone.png", "mimeType": "image/png", "buffer": two_tone_png()})
    page.get_by_role("button", name="Classify with masks").click()
    page.wait_for_url("**/audit/#/p/*")
    prediction_id = page.url.rsplit("/", 1)[1]
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Prediction {prediction_id}")

    with authed(service_url) as client:
        record = client.get(f"/v1/predictions/{prediction_id}").json()
    modules = [entry["module"] for entry in record["images"][0]["attention"]]
    assert len(modules) == 9
    strip = page.locator("#module-strip button")
    expect(strip).to_have_count(len(modules))
    for i, module in enumerate(modules):   # one overlay per module, in network order, each named for a reader
        named = re.compile(f"module {re.escape(module)} ")
        expect(strip.nth(i).locator("canvas")).to_have_attribute("aria-label", named)
    expect(page.locator("#module-picker option")).to_have_text(modules)

    expect(page.locator("#topk .label")).to_have_text([entry["label"] for entry in record["images"][0]["top_k"]])

    # the picture is there: at opacity 0 the canvas shows the upload (bright left half, dark right half)
    canvas = page.locator("#overlay-canvas")
    page.get_by_role("slider", name="Opacity").fill("0")
    expect(canvas).to_have_attribute("aria-label", re.compile("opacity 0 %"))
    bare = canvas_pixels(page, "#overlay-canvas").astype(int)
    assert bare.shape[1] > bare.shape[0]   # the upload's 3:2 proportions
    brightness = bare[:, :, :3].mean(axis=2)
    quarter = bare.shape[1] // 4
    assert brightness[:, :quarter].mean() > brightness[:, -quarter:].mean() + 60

    page.get_by_role("slider", name="Opacity").fill("70")
    expect(canvas).to_have_attribute("aria-label", re.compile(f"module {modules[0]} .*opacity 70 %"))
    first = canvas_pixels(page, "#overlay-canvas")
    assert np.abs(first.astype(int) - bare).max() > 0, "the mask is drawn over the picture"
    page.get_by_role("combobox", name="Module").select_option(label=modules[-1])
    expect(canvas).to_have_attribute("aria-label", re.compile(f"module {re.escape(modules[-1])} "))
    expect(strip.nth(len(modules) - 1)).to_have_attribute("aria-pressed", "true")
    last = canvas_pixels(page, "#overlay-canvas")
    assert not np.array_equal(first, last), "switching modules redraws the overlay"
    strip.nth(0).click()
    expect(canvas).to_have_attribute("aria-label", re.compile(f"module {re.escape(modules[0])} "))
    page.keyboard.press("ArrowRight")
    expect(canvas).to_have_attribute("aria-label", re.compile(f"module {re.escape(modules[1])} "))
    expect(strip.nth(1)).to_be_focused()

    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download the record (JSON)").click()
    download = download_info.value
    assert download.suggested_filename == f"prediction-{prediction_id}.json"
    assert json.loads(Path(download.path()).read_text())["id"] == prediction_id
    screenshot(page, "audit-detail-upload")

    assert len(prompts) == 1, "the key is asked for once"
    keys = [headers.get("x-api-key") for _, url, headers in guard.requests if "/v1/" in url]
    first_with_key = keys.index(API_KEY)  # calls before the prompt went without; every one after it has the key
    assert set(keys[first_with_key:]) == {API_KEY} and set(keys[:first_with_key]) <= {None}
    assert not any(API_KEY in url for url in guard.urls())


def test_docs_make_no_request_outside_the_app(service_url, open_page):
    """Waits on /docs being self-hosted (helper core); fails while /docs loads Swagger UI from a CDN."""
    page, guard = open_page(service_url)
    page.goto("/docs", wait_until="load")
    guard.assert_inside("/docs")
    page.locator(".swagger-ui .opblock").first.wait_for()
