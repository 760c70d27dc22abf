"""``python -m service`` as a real process: serve a checkpoint made by ``python -m training`` and classify a real
photo with masks; SIGTERM with requests in flight answers every one of them, flushes the audit store, exits."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from tests.conftest import make_checkpoint
from tests.integration.live_stack import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]



@contextlib.contextmanager
def service_process(model_dir: Path, workdir: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start ``python -m service`` on a free port; yields (process, base URL) once /readyz says 200."""
    port = free_port()
    log = (workdir / "service.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port),
                                "--audit-db", str(workdir / "audit.db"), "--device", "cpu", *args],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (workdir / "service.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "service did not become ready in 90 s"
            time.sleep(0.2)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        log.close()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_trained_checkpoint_served_by_a_real_process_classifies_a_photo_with_masks(tmp_path):
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "training", "--arch", "resnet20", "--attention", "cbam",
                            "--dataset", "mnist5k", "--epochs", "1", "--limit-train", "64", "--limit-val", "32",
                            "--workers", "0", "--out", str(run)], cwd=ROOT, capture_output=True, text=True,
                           timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (run / "model.safetensors").rename(model_dir / "digits.safetensors")
    photo = png(data.astronaut())
    with service_process(model_dir, tmp_path) as (_, base):
        info = httpx.get(f"{base}/v1/models/digits").json()
        resp = httpx.post(f"{base}/v1/predict", params={"attention": "true", "top_k": 3},
                          files={"file": ("astronaut.png", photo, "image/png")}, timeout=30)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        record = httpx.get(f"{base}/v1/predictions/{body['id']}").json()
    assert info["arch"] == "resnet20" and info["attention"] == "cbam" and info["num_classes"] == 10
    assert body["model"] == {"name": "digits", "version": info["version"]}
    (pred,) = body["predictions"]
    assert len(pred["top_k"]) == 3 and {t["label"] for t in pred["top_k"]} <= set(info["classes"])
    assert len(pred["attention"]) == 9  # resnet20: 3 stages x 3 blocks, one CBAM each
    for entry in pred["attention"]:
        mask = Image.open(io.BytesIO(base64.b64decode(entry["png"])))
        assert mask.mode == "L" and mask.size == (entry["width"], entry["height"])
    assert record["images"][0]["width"] == 512 and record["images"][0]["attention"] == pred["attention"]


def scrape(base: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == "macula_inflight_requests" or (
                    sample.name == "macula_requests_total" and "predict" in sample.labels.get("route", "")):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def test_sigterm_answers_every_accepted_request_then_exits(tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    make_checkpoint(model_dir / "big.safetensors", arch="resnet18", attention="cbam", num_classes=10, color="RGB",
                    size=160)
    files = [("file", (f"{i}.png", png(data.coffee()[:200, :200]), "image/png")) for i in range(4)]
    requests = 12
    with service_process(model_dir, tmp_path, "--max-batch-size", "4", "--drain-timeout-s", "60") as (process, base):
        with ThreadPoolExecutor(requests) as pool:
            answers = [pool.submit(httpx.post, f"{base}/v1/predict", files=files, timeout=120)
                       for _ in range(requests)]
            deadline = time.monotonic() + 30
            while True:  # every request accepted: answered already, or being handled (minus this scrape)
                seen = scrape(base)
                in_flight = seen.get("macula_inflight_requests", 0) - 1
                if seen.get("macula_requests_total", 0) + in_flight >= requests:
                    break
                assert time.monotonic() < deadline, f"requests were not all accepted: {seen}"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(httpx.HTTPError):  # new work after the signal: refused or 503, never 200
                assert httpx.get(f"{base}/readyz", timeout=5).status_code == 503
            responses = [a.result() for a in answers]
        returncode = process.wait(60)
    assert in_flight > 0, "no request was in flight at SIGTERM: the test proved nothing (make the work longer)"
    # Every one reached the server before the signal, so every one gets its real answer (docs/api.md), also those
    # whose route had not run yet: never a 503, a plain-text 500 or a dropped connection.
    answered = [r for r in responses if r.status_code == 200]
    assert len(answered) == requests, [(r.status_code, r.text[:200]) for r in responses]
    assert returncode == 0, (tmp_path / "service.log").read_text()[-3000:]
    with sqlite3.connect(tmp_path / "audit.db") as db:
        assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == len(answered)


def sixteen_bit_png(width: int = 7200, height: int = 5400) -> bytes:
    """A 39 MP 16-bit greyscale PNG (a horizontal ramp, so ~90 KB compressed)."""
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // (width - 1)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (height, width)))).save(buf, format="PNG")
    return buf.getvalue()


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_eight_39_megapixel_16_bit_pngs_decode_within_the_memory_budget_and_share_the_pool(tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    make_checkpoint(model_dir / "gray.safetensors", size=48)
    big = sixteen_bit_png()
    small = png(np.full((40, 40), 128, np.uint8))
    with service_process(model_dir, tmp_path, "--decode-threads", "2", "--request-timeout-s", "600") as (process, base):
        before = peak_rss_bytes(process.pid)
        finished: list[str] = []

        def post(name: str, files: list) -> httpx.Response:
            resp = httpx.post(f"{base}/v1/predict", files=files, timeout=600)
            finished.append(name)
            return resp

        with ThreadPoolExecutor(2) as pool:
            heavy = pool.submit(post, "heavy", [("file", (f"{i}.png", big, "image/png")) for i in range(8)])
            time.sleep(0.5)  # let the heavy request start decoding; the order below holds either way
            light = pool.submit(post, "light", [("file", ("small.png", small, "image/png"))])
            heavy_resp, light_resp = heavy.result(), light.result()
        growth = peak_rss_bytes(process.pid) - before
    assert heavy_resp.status_code == 200 and len(heavy_resp.json()["predictions"]) == 8, heavy_resp.text[:500]
    assert light_resp.status_code == 200
    assert finished == ["light", "heavy"], "a one-image request waited for all eight large decodes"
    assert growth < 600 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB decoding 8 x 39 MP 16-bit PNGs"


def test_sigterm_answers_requests_still_decoding_with_json_503_never_plain_500(tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    make_checkpoint(model_dir / "gray.safetensors", size=48)
    files = [("file", (f"{i}.png", sixteen_bit_png(), "image/png")) for i in range(4)]
    with service_process(model_dir, tmp_path, "--decode-threads", "1", "--drain-timeout-s", "2",
                         "--request-timeout-s", "600") as (process, base):
        with ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(httpx.post, f"{base}/v1/predict", files=files, timeout=120) for _ in range(3)]
            deadline = time.monotonic() + 30
            while scrape(base).get("macula_inflight_requests", 0) - 1 < 3:  # all three accepted (minus the scrape)
                assert time.monotonic() < deadline, "the requests were not all accepted"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            responses = [a.result() for a in answers]
        returncode = process.wait(60)
    log = (tmp_path / "service.log").read_text()
    for resp in responses:
        assert resp.headers["content-type"] == "application/json", (resp.status_code, resp.text[:200])
        assert resp.status_code == 200 or (resp.status_code, resp.json()["code"]) == (503, "not_ready"), resp.text
    assert any(resp.status_code == 503 for resp in responses), "nothing was still decoding: the test proved nothing"
    assert returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
