"""kill -9 of a real ``python -m service`` under load in durable mode: every id it answered 200 is in the store
afterwards (on SQLite and on PostgreSQL). Best-effort mode may lose the records still queued; durable may not."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.audit import open_backend
from tests.integration.audit_pg import free_port
from tests.integration.service_testing import model_dir_with

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 8
ANSWERS_BEFORE_KILL = 60


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return request.getfixturevalue("pg_url")


def start_service(model_dir: Path, url: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MACULA_AUDIT_URL": url, "MACULA_AUDIT_DURABLE": "true"}
    process = subprocess.Popen([sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port),
                                "--device", "cpu", "--torch-threads", "1", "--log-level", "warning"],
                               cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        assert time.monotonic() < deadline, "service did not become ready in 90 s"
        time.sleep(0.2)


def test_kill_9_in_durable_mode_loses_no_answered_record(tmp_path, gray_checkpoint, url):
    model_dir = model_dir_with(tmp_path / "models", gray=gray_checkpoint)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(buf, format="PNG")
    blob = buf.getvalue()
    process, base = start_service(model_dir, url, tmp_path / "service.log")
    answered: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            while True:
                try:
                    resp = http.post(f"{base}/v1/predict", content=blob, headers={"Content-Type": "image/png"})
                except httpx.HTTPError:
                    return   # the server is gone
                if resp.status_code == 200:
                    with lock:
                        answered.append(resp.json()["id"])

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(answered) < ANSWERS_BEFORE_KILL:
            assert time.monotonic() < deadline, f"only {len(answered)} answers in 60 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)   # mid-load: requests are queued, running and committing
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for thread in threads:
            thread.join(20)
    backend = open_backend(url)
    backend.open()
    try:
        lost = [pid for pid in answered if backend.get(pid) is None]
    finally:
        backend.close()
    assert len(answered) >= ANSWERS_BEFORE_KILL
    assert lost == [], f"{len(lost)} of {len(answered)} answered predictions have no record"
