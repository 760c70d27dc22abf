"""A real Prometheus server scrapes our /metrics and answers queries about what it saw.

One Prometheus (Debian package ``prometheus``, free loopback port, throw-away TSDB, 1 s scrapes)
scrapes two targets: a bare http.server exposing a hand-fed :class:`Metrics` (exact values, no app in
the way) and the real service (``create_app`` under uvicorn) after a known amount of predict traffic,
so every count Prometheus reports can be checked exactly. Every wait is bounded; every process and
thread is stopped.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from live_stack import prometheus, query, running_service, wait_until
from PIL import Image

from service.metrics import Metrics

pytestmark = pytest.mark.e2e


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


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((36, 30), 30 + seed).save(buffer, format="PNG")
    return buffer.getvalue()


# Traffic sent to the real service: REQUESTS predict calls with IMAGES_PER_REQUEST images each, then one 415.
REQUESTS, IMAGES_PER_REQUEST = 3, 2


def send_predictions(target: str) -> list[dict]:
    with httpx.Client(base_url=f"http://{target}", timeout=30) as client:
        answers = [client.post("/v1/models/gray/predict", params={"top_k": 3},
                               files=[("file", (f"{i}-{j}.png", png(i + j), "image/png"))
                                      for j in range(IMAGES_PER_REQUEST)]) for i in range(REQUESTS)]
        assert [a.status_code for a in answers] == [200] * REQUESTS, [a.text for a in answers]
        gif = client.post("/v1/predict", content=b"GIF89a", headers={"Content-Type": "image/gif"})
        assert gif.status_code == 415
    return [a.json() for a in answers]


def fed_metrics() -> Metrics:
    """A Metrics with known observations for the bare target."""
    metrics = Metrics()
    metrics.set_model_info("demo", "0123456789ab", "resnet20", "cbam")
    metrics.set_ready(True)
    for status in (200, 200, 200, 415):
        metrics.observe_request("/v1/predict", "POST", status, 0.02)
    metrics.observe_batch("demo", 3, 0.05)
    metrics.reject("unsupported_format")
    return metrics


@pytest.fixture(scope="module")
def scraped(gray_checkpoint, tmp_path_factory) -> Iterator[dict]:
    """Prometheus after it has scraped both targets, the service after its traffic."""
    models = tmp_path_factory.mktemp("model_store")
    shutil.copy(gray_checkpoint, models / "gray.safetensors")
    work = tmp_path_factory.mktemp("prometheus")
    with (metrics_only_target(fed_metrics()) as bare,
          running_service(models, work / "audit.db", max_batch_size=4) as app,
          prometheus([bare, app], work) as prom):
        answers = send_predictions(app)
        ok = f'macula_requests_total{{instance="{app}",route="/v1/models/{{name}}/predict",status="200"}}'
        wait_until(lambda: scraped_value(prom, ok) == REQUESTS, 30, "the predictions in Prometheus")
        wait_until(lambda: scraped_value(prom, f'up{{instance="{bare}"}}') == 1, 10, "a scrape of the bare target")
        yield {"prometheus": prom, "bare": bare, "app": app, "answers": answers}


def test_prometheus_ingests_the_bare_exposition(scraped):
    prom, on = scraped["prometheus"], f'instance="{scraped["bare"]}"'
    assert scraped_value(prom, f'macula_requests_total{{{on},route="/v1/predict",method="POST",status="200"}}') == 3
    assert scraped_value(prom, f'macula_requests_total{{{on},status="415"}}') == 1
    assert scraped_value(prom, f'macula_rejections_total{{{on},reason="unsupported_format"}}') == 1
    assert scraped_value(prom, f'macula_batch_size_sum{{{on},model="demo"}}') == 3
    assert scraped_value(prom, f'macula_model_info{{{on},name="demo",attention="cbam"}}') == 1
    assert scraped_value(prom, f"macula_ready{{{on}}}") == 1
    median = f"histogram_quantile(0.5, sum by (le) (macula_request_duration_seconds_bucket{{{on}}}))"
    assert 0.01 < scraped_value(prom, median) <= 0.025


def test_prometheus_counts_the_service_traffic_exactly(scraped):
    prom, on = scraped["prometheus"], f'instance="{scraped["app"]}"'
    images = REQUESTS * IMAGES_PER_REQUEST
    assert scraped_value(prom, f'up{{{on}}}') == 1
    assert scraped_value(prom, f'macula_images_total{{{on},model="gray"}}') == images
    assert scraped_value(prom, f'macula_top1_confidence_count{{{on},model="gray"}}') == images
    assert scraped_value(prom, f'macula_preprocess_duration_seconds_count{{{on},model="gray"}}') == images
    assert scraped_value(prom, f'macula_requests_total{{{on},route="/v1/predict",status="415"}}') == 1
    assert scraped_value(prom, f'macula_rejections_total{{{on},reason="unsupported_format"}}') == 1
    assert scraped_value(prom, f'macula_model_info{{{on},name="gray",arch="resnet20",attention="cbam"}}') == 1
    assert scraped_value(prom, f"macula_ready{{{on}}}") == 1
    # warm-up batches run before traffic, so the batch-size histogram holds at least the real images
    assert scraped_value(prom, f'macula_batch_size_sum{{{on},model="gray"}}') >= images


def test_audit_writes_reach_prometheus_and_records_match_responses(scraped):
    prom, app, on = scraped["prometheus"], scraped["app"], f'instance="{scraped["app"]}"'
    written = f"macula_audit_records_written_total{{{on}}}"
    wait_until(lambda: scraped_value(prom, written) == REQUESTS, 10, "every audit record counted")
    assert scraped_value(prom, f"macula_audit_write_failures_total{{{on}}}") == 0
    for answer in scraped["answers"]:
        record = httpx.get(f"http://{app}/v1/predictions/{answer['id']}", timeout=5).json()
        assert record["model"] == {**answer["model"], "precision": record["model"]["precision"]}
        assert record["model"]["precision"] in ("float32", "bfloat16")
        assert [image["top_k"] for image in record["images"]] == [p["top_k"] for p in answer["predictions"]]
