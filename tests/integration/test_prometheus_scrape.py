"""A real Prometheus server scrapes our /metrics and answers queries about what it saw.

Proves the exposition (content type included) is what Prometheus itself ingests, not just what
promtool lints. Prometheus (Debian package ``prometheus``) runs on a free loopback port with a
throw-away TSDB and a 1 s scrape interval; every wait is bounded and the process is always killed.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from service.metrics import Metrics

pytestmark = pytest.mark.e2e

PROMETHEUS = "/usr/bin/prometheus"
SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: macula
    static_configs:
      - targets: [{targets}]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last_error = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})")


@contextlib.contextmanager
def prometheus(targets: list[str], workdir: Path) -> Iterator[str]:
    """Run Prometheus scraping ``targets`` (host:port); yields its base URL."""
    config = workdir / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(targets=", ".join(f"'{t}'" for t in targets)))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and httpx.get(f"{base}/-/ready", timeout=2).status_code == 200,
                   timeout=30, what="Prometheus to become ready")
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
    reply.raise_for_status()
    body = reply.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scraped_value(base: str, promql: str) -> float | None:
    result = query(base, promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None


@contextlib.contextmanager
def metrics_only_target(metrics: Metrics) -> Iterator[str]:
    """A bare http.server exposing ``metrics.render()`` at /metrics; yields host:port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = metrics.render()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_prometheus_ingests_the_exposition(tmp_path):
    metrics = Metrics()
    metrics.set_model_info("demo", "0123456789ab", "resnet20", "cbam")
    metrics.set_ready(True)
    with metrics_only_target(metrics) as target, prometheus([target], tmp_path) as base:
        wait_until(lambda: scraped_value(base, f'up{{instance="{target}"}}') == 1, 20, "the first scrape")
        for status in (200, 200, 200, 415):
            metrics.observe_request("/v1/predict", "POST", status, 0.02)
        metrics.observe_batch("demo", 3, 0.05)
        metrics.reject("unsupported_format")

        ok = 'macula_requests_total{route="/v1/predict",method="POST",status="200"}'
        wait_until(lambda: scraped_value(base, ok) == 3, 20, "3 requests with status 200 in Prometheus")
        assert scraped_value(base, 'macula_requests_total{status="415"}') == 1
        assert scraped_value(base, 'macula_rejections_total{reason="unsupported_format"}') == 1
        assert scraped_value(base, 'macula_batch_size_count{model="demo"}') == 1
        assert scraped_value(base, 'macula_model_info{name="demo",attention="cbam"}') == 1
        assert scraped_value(base, "macula_ready") == 1
        median = scraped_value(base, "histogram_quantile(0.5, sum by (le) (macula_request_duration_seconds_bucket))")
        assert median is not None and 0.01 < median <= 0.025
