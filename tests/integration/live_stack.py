"""A live monitoring stack for integration tests: the real app under uvicorn in a thread and the Debian
Prometheus binary, both on free loopback ports. Every wait is bounded; every process and thread is stopped."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import torch
import uvicorn
import yaml

from service.app import create_app
from service.settings import Settings


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_service(model_dir: Path, audit_db: Path, **settings: object) -> Iterator[str]:
    """``create_app`` under uvicorn in a thread on a free loopback port; yields host:port once /readyz is 200."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Settings(model_dir=model_dir, audit_db=str(audit_db), device=device, torch_threads=1,
                      decode_threads=1, drain_timeout_s=2, **settings)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    target = f"127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_until(lambda: httpx.get(f"http://{target}/readyz", timeout=2).status_code == 200, 60,
                   "the service to be ready")
        yield target
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@contextlib.contextmanager
def prometheus(targets: Sequence[str], workdir: Path, *, rule_files: Sequence[Path] = ()) -> Iterator[str]:
    """The Debian Prometheus scraping ``targets`` (host:port) every second; yields its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: apt-get install prometheus (make system-deps)"
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(path) for path in rule_files],
              "scrape_configs": [{"job_name": "macula", "static_configs": [{"targets": list(targets)}]}]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{free_port()}"
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                                f"--storage.tsdb.path={workdir / 'tsdb'}",
                                f"--web.listen-address={base.removeprefix('http://')}", "--log.level=warn"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: process.poll() is None and httpx.get(f"{base}/-/ready", timeout=2).status_code == 200,
                   30, "Prometheus to be ready")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def query(base: str, promql: str) -> list[dict]:
    """An instant query's result vector."""
    reply = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]
