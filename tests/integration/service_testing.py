"""Helpers for the service's integration tests: run the app with its lifespan, talk to it through httpx."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.server import DrainingServer, config
from service.settings import Settings


def model_dir_with(target: Path, **checkpoints: Path) -> Path:
    """A model dir holding copies of ``checkpoints`` under the given names."""
    target.mkdir(parents=True, exist_ok=True)
    for name, path in checkpoints.items():
        shutil.copy(path, target / f"{name}.safetensors")
    return target


@asynccontextmanager
async def serving(model_dir: Path, tmp_path: Path, **overrides) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running (models loaded and warmed up) and an httpx client on it."""
    # float32, so that answers compare with the plain model to 1e-3 (bf16 has its own runner and e2e tests)
    # the models run on the inference thread: test_inference_process.py covers the worker process (the default)
    defaults = {"audit_db": str(tmp_path / "audit.db"), "device": "cpu", "max_batch_size": 8, "max_batch_delay_ms": 5,
                "amp_dtype": "none", "inference_process": False}
    settings = Settings(model_dir=model_dir, **{**defaults, **overrides})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.service.wait_started()  # the lifespan loads in the background; these tests want it loaded
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://macula.test", timeout=60) as client:
            yield app, client


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_image(seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


def metric_samples(text: str, name: str) -> dict[tuple, float]:
    """``{(label items...): value}`` of one sample name in a Prometheus scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def assert_same_predictions(got: list[dict], expected: list[dict], atol: float = 1e-4) -> None:
    """Same classes in the same order with scores within ``atol`` (batch composition may move the last bits)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert [t["index"] for t in g["top_k"]] == [t["index"] for t in e["top_k"]]
        for gt, et in zip(g["top_k"], e["top_k"], strict=True):
            assert abs(gt["score"] - et["score"]) <= atol, (gt, et)


@contextmanager
def live_server(model_dir: Path, tmp_path: Path, **overrides) -> Iterator[str]:
    """The app under a real uvicorn server in a thread, on a free loopback port; yields its base URL once ready.

    For what only a real socket shows: curl's own requests, half-sent requests, connection handling."""
    defaults = {"audit_db": str(tmp_path / "audit.db"), "device": "cpu", "amp_dtype": "none", "drain_timeout_s": 2,
                "inference_process": False}
    settings = Settings(model_dir=model_dir, **{**defaults, **overrides})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(settings)
    server = DrainingServer(config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 60
        while not server.started or httpx.get(f"{base}/readyz", timeout=2).status_code != 200:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not become ready in 60 s"
            time.sleep(0.1)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
