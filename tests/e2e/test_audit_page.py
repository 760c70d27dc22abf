"""The auditor's page (/audit/) and /docs in a real browser (Debian's chromium, headless, via Playwright)
against ``python -m service`` as a real process, with an API key set. Every page opened here fails its test if
it makes a request outside the app (see conftest.py)."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import expect

from models import Preprocessing, create_model, save_checkpoint
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


def noise_png(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def other_checkpoint(path: Path) -> Path:
    """resnet20 + BAM, RGB, 4 classes named other_0..3: labels that the demo model never gives."""
    torch.manual_seed(1)
    model = create_model("resnet20", attention="bam", num_classes=4, in_chans=3)
    pre = Preprocessing(input_size=(32, 32), resize_mode="stretch", resize_size=32, mean=(0.5,) * 3,
                        std=(0.25,) * 3, color="RGB")
    save_checkpoint(model, path, class_names=[f"other_{i}" for i in range(4)], preprocessing=pre,
                    training={"dataset": "random-init", "note": "test fixture"})
    return path


def model_dir_for(workdir: Path) -> Path:
    model_dir = workdir / "models"
    model_dir.mkdir()
    make_checkpoint(model_dir / "demo.safetensors")  # resnet20 + CBAM: nine attention modules
    other_checkpoint(model_dir / "other.safetensors")
    return model_dir


@pytest.fixture(scope="module")
def service_url(tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("audit-page")
    with running_service(model_dir_for(workdir), workdir, "--audit-db", str(workdir / "audit.db"),
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


def rows(page):
    return page.locator("#list tbody tr")


def row_ids(page) -> list[str]:
    return [label.removeprefix("Open prediction ")
            for label in page.locator("#list tbody a.row-link").evaluate_all("as => as.map(a => a.ariaLabel)")]


def test_three_predictions_listed_filtered_opened_and_overlaid(tmp_path, open_page, screenshot):
    with running_service(model_dir_for(tmp_path), tmp_path, "--audit-db", str(tmp_path / "audit.db"),
                         env={"MACULA_API_KEY": API_KEY}) as base, authed(base) as client:
        made = []
        for model, blob in (("demo", two_tone_png()), ("demo", noise_png(1)), ("other", noise_png(2))):
            resp = client.post(f"/v1/models/{model}/predict", params={"attention": "true"},
                               files=[("file", ("x.png", blob, "image/png"))])
            assert resp.status_code == 200, resp.text
            made.append((resp.json()["id"], model, resp.json()["predictions"][0]["top_k"][0]["label"]))
        newest_first = [pid for pid, _, _ in reversed(made)]
        page, guard = open_page(base)
        prompts = answer_key_prompts(page)
        page.goto("/audit/")
        expect(rows(page)).to_have_count(3)
        assert row_ids(page) == newest_first
        for i in range(3):   # each thumbnail fetched with the key and shown from a blob: address
            expect(rows(page).nth(i).locator("img.thumb")).to_have_attribute("src", re.compile("^blob:"))
        expect(rows(page).nth(0).locator("td").nth(2)).to_have_text(made[2][2])
        screenshot(page, "audit-list")

        label = made[0][2]   # a demo label: the other model's row never carries it
        page.get_by_label("Top-1 label").fill(label)
        page.get_by_role("button", name="Apply").click()
        expected = [pid for pid, _, top in reversed(made) if top == label]
        expect(rows(page)).to_have_count(len(expected))
        assert row_ids(page) == expected and "label=" in page.url
        page.get_by_role("button", name="Clear").click()
        expect(rows(page)).to_have_count(3)
        page.get_by_label("Model").select_option("other")
        page.get_by_role("button", name="Apply").click()
        expect(rows(page)).to_have_count(1)
        assert row_ids(page) == [made[2][0]]
        page.get_by_label("Model").select_option("")
        page.get_by_label("Score from").fill("1")
        page.get_by_role("button", name="Apply").click()
        expect(page.get_by_text("No prediction matches these filters.")).to_be_visible()
        page.get_by_role("button", name="Clear").click()
        expect(rows(page)).to_have_count(3)
        page.get_by_label("Familiar input").select_option("false")   # these models have no detector: no flag
        page.get_by_role("button", name="Apply").click()
        expect(page.get_by_text("No prediction matches these filters.")).to_be_visible()
        assert "familiar=false" in page.url
        page.get_by_role("button", name="Clear").click()
        expect(rows(page)).to_have_count(3)

        # keyboard: arrow down from the first row's link, Enter opens the second (the noise image on demo)
        page.locator("#list tbody a.row-link").first.focus()
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Enter")
        opened = made[1][0]
        expect(page.get_by_role("heading", level=1)).to_have_text(f"Prediction {opened}")
        record = client.get(f"/v1/predictions/{opened}").json()
        modules = [entry["module"] for entry in record["images"][0]["attention"]]
        strip = page.locator("#module-strip button")
        expect(strip).to_have_count(len(modules))
        canvas = page.locator("#overlay-canvas")
        expect(canvas).to_have_attribute("aria-label", re.compile(f"module {re.escape(modules[0])} "))
        expect(page.locator("#input-note")).to_be_hidden()   # the kept input is there, no stand-in
        page.get_by_role("combobox", name="Module").select_option(label=modules[4])
        expect(canvas).to_have_attribute("aria-label", re.compile(f"module {re.escape(modules[4])} "))
        page.get_by_label("Stretch contrast").check()
        expect(canvas).to_have_attribute("aria-label", re.compile("contrast stretched"))

        with page.expect_download() as download_info:   # the server's overlay of what is on screen
            page.get_by_role("button", name="Download this overlay (PNG)").click()
        with Image.open(download_info.value.path()) as png:
            kept = Image.open(io.BytesIO(client.get(f"/v1/predictions/{opened}/images/0").content))
            assert png.size == kept.size and png.text["module"] == modules[4]
        screenshot(page, "audit-detail")

        page.keyboard.press("Escape")
        expect(rows(page)).to_have_count(3)
        assert len(prompts) == 1


def test_first_page_of_a_thousand_records_renders_alone_and_pages_on(tmp_path, open_page):
    with running_service(model_dir_for(tmp_path), tmp_path, "--audit-db", str(tmp_path / "audit.db")) as base, \
            httpx.Client(base_url=base, timeout=60) as client:
        blob = noise_png(3)

        def predict(_: int) -> None:
            resp = client.post("/v1/predict", content=blob, headers={"Content-Type": "image/png"})
            assert resp.status_code == 200, resp.text

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(predict, range(1000)))
        page, guard = open_page(base)
        page.goto("/audit/")
        expect(rows(page)).to_have_count(50)
        rendered_ms = page.evaluate("performance.getEntriesByName('audit:list-rendered')[0].startTime")
        print(f"first render of the list with 1000 records: {rendered_ms:.0f} ms after navigation start")
        # the first row's thumbnail is in view: wait for it, then count what was asked
        expect(page.locator("#list tbody img.thumb").first).to_have_attribute("src", re.compile("^blob:"))
        searches = guard.urls("/v1/predictions")
        assert [url for url in searches if "/images/" not in url] == [f"{base}/v1/predictions?limit=50"]
        thumbs = [url for url in searches if "/images/" in url]
        assert 0 < len(thumbs) < 50, "thumbnails load as their rows come into view, not all at once"
        first_page = row_ids(page)
        page.get_by_role("button", name="Next page").click()
        expect(page.locator("#list tbody a.row-link").first).not_to_have_attribute(
            "aria-label", f"Open prediction {first_page[0]}")
        second_page = row_ids(page)
        assert len(second_page) == 50 and not set(first_page) & set(second_page)
        page.go_back()
        expect(page.locator("#list tbody a.row-link").first).to_have_attribute(
            "aria-label", f"Open prediction {first_page[0]}")


def test_docs_make_no_request_outside_the_app(service_url, open_page):
    """Waits on /docs being self-hosted (helper core); fails while /docs loads Swagger UI from a CDN."""
    page, guard = open_page(service_url)
    page.goto("/docs", wait_until="load")
    guard.assert_inside("/docs")
    page.locator(".swagger-ui .opblock").first.wait_for()
