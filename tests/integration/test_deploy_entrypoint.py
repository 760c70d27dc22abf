"""What the container runs, run here without Docker: the Dockerfile's ENTRYPOINT with the image's MACULA_*
environment (paths moved into a temp dir), probed by the Dockerfile's own HEALTHCHECK command, then stopped
with SIGTERM the way `docker stop` and the kubelet do: it must exit cleanly within the drain timeout, well
inside the Kubernetes grace period.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from live_stack import free_port
from PIL import Image

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DRAIN_TIMEOUT_S = 3


def dockerfile_lines() -> list[str]:
    return re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text()).splitlines()


def image_environment(models: Path, data: Path) -> dict[str, str]:
    """MACULA_* from the runtime stage's ENV lines, with /models and /data moved to the given directories."""
    env: dict[str, str] = {}
    for line in dockerfile_lines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split() if pair.startswith("MACULA_"))
    return {k: v.replace("/models", str(models)).replace("/data", str(data)) for k, v in env.items()}


def instruction_json(keyword: str) -> list[str]:
    line = next(line for line in dockerfile_lines() if line.startswith(keyword))
    return json.loads(line[line.index("["):])


def healthcheck(env: dict[str, str]) -> int:
    command = instruction_json("HEALTHCHECK")
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


def test_entrypoint_serves_passes_its_healthcheck_and_drains_on_sigterm(gray_checkpoint, tmp_path):
    models, data = tmp_path / "models", tmp_path / "data"
    models.mkdir()
    data.mkdir()
    shutil.copy(gray_checkpoint, models / "demo.safetensors")
    image_env = image_environment(models, data)
    assert image_env["MACULA_HOST"] == "0.0.0.0"
    port = free_port()
    env = {**os.environ, **image_env, "MACULA_PORT": str(port), "MACULA_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
           "MACULA_TORCH_THREADS": "1", "PYTHONPATH": str(ROOT)}
    entrypoint = instruction_json("ENTRYPOINT")
    assert entrypoint[:3] == ["python", "-m", "service"]
    assert healthcheck(env) != 0  # nothing listens yet: the check must be able to fail

    log = (tmp_path / "service.log").open("wb")
    process = subprocess.Popen([sys.executable, *entrypoint[1:]], cwd=data, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while healthcheck(env) != 0:
            assert process.poll() is None, (tmp_path / "service.log").read_text()
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.5)
        image = io.BytesIO()
        Image.effect_noise((32, 32), 50).save(image, format="PNG")
        reply = httpx.post(f"{base}/v1/predict", content=image.getvalue(), headers={"Content-Type": "image/png"},
                           timeout=30)
        assert reply.status_code == 200, reply.text

        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=DRAIN_TIMEOUT_S + 10)
        elapsed = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()

    output = (tmp_path / "service.log").read_text()
    # uvicorn re-raises the signal once its graceful shutdown is done, so -SIGTERM is a clean exit too.
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output, output
    assert f"running on http://0.0.0.0:{port}" in output  # MACULA_HOST from the image, no --host flag
    assert healthcheck(env) != 0
    # The prediction's audit record went where the image puts it (the /data volume) and survived the shutdown.
    audit_db = Path(image_env["MACULA_AUDIT_DB"])
    assert audit_db.parent == data
    with contextlib.closing(sqlite3.connect(audit_db)) as db:
        assert db.execute("SELECT id FROM predictions").fetchall() == [(reply.json()["id"],)]
    # The same shutdown inside a pod: preStop pause + this drain must fit the grace period (with the real timeout).
    pod = yaml.safe_load((ROOT / "deploy/k8s/deployment.yaml").read_text())["spec"]["template"]["spec"]
    pre_stop = float(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pre_stop + elapsed < pod["terminationGracePeriodSeconds"]
