"""Metrics: every agreed name is exposed, promtool accepts the output, labels stay bounded."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import BATCH_SIZE_BUCKETS, CONFIDENCE_BUCKETS, OTHER, REJECTION_REASONS, Metrics

# (family name as the parser reports it, type, label names) for every metric in notes/service-spec.md
SPEC = [
    ("macula_requests", "counter", {"route", "method", "status"}),
    ("macula_request_duration_seconds", "histogram", {"route"}),
    ("macula_queue_wait_seconds", "histogram", {"model"}),
    ("macula_batch_size", "histogram", {"model"}),
    ("macula_inference_duration_seconds", "histogram", {"model"}),
    ("macula_preprocess_duration_seconds", "histogram", {"model"}),
    ("macula_queue_depth", "gauge", {"model"}),
    ("macula_rejections", "counter", {"reason"}),
    ("macula_images", "counter", {"model"}),
    ("macula_top1_confidence", "histogram", {"model"}),
    ("macula_model_info", "gauge", {"name", "version", "arch", "attention"}),
    ("macula_ready", "gauge", set()),
    ("macula_inflight_requests", "gauge", set()),
    ("macula_audit_records_written", "counter", set()),
    ("macula_audit_write_failures", "counter", set()),
]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def exercised() -> Metrics:
    """A Metrics with one observation in every metric."""
    metrics = Metrics()
    metrics.observe_request("/v1/models/{name}/predict", "POST", 200, 0.012)
    metrics.observe_queue_wait("demo", 0.002)
    metrics.observe_batch("demo", 4, 0.03)
    metrics.observe_preprocess("demo", 0.0005)
    metrics.set_queue_depth("demo", 3)
    metrics.reject("overload")
    metrics.observe_predictions("demo", [0.97])
    metrics.set_model_info("demo", "0123456789ab", "resnet20", "cbam")
    metrics.set_ready(True)
    metrics.audit_written(2)
    metrics.audit_failed()
    with metrics.track_inflight():
        pass
    return metrics


def families(metrics: Metrics) -> dict:
    body, _ = metrics.render()
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def sample_value(metrics: Metrics, name: str, /, **labels: str) -> float | None:
    for family in families(metrics).values():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_render_returns_prometheus_text():
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain; version=") and "charset=utf-8" in content_type
    assert isinstance(body, bytes) and b"# TYPE macula_ready gauge" in body


@pytest.mark.parametrize(("name", "kind", "labels"), SPEC, ids=[s[0] for s in SPEC])
def test_every_spec_metric_is_exposed_with_its_labels(name, kind, labels):
    family = families(exercised())[name]
    assert family.type == kind
    observed = [s for s in family.samples if not s.name.endswith("_created")]
    assert observed, f"{name} has no samples"
    assert {key for s in observed for key in s.labels} - {"le"} == labels


def test_observations_land_in_the_right_series():
    metrics = exercised()
    route = "/v1/models/{name}/predict"
    assert sample_value(metrics, "macula_requests_total", route=route, method="POST", status="200") == 1
    assert sample_value(metrics, "macula_request_duration_seconds_count", route=route) == 1
    assert sample_value(metrics, "macula_batch_size_bucket", model="demo", le="4.0") == 1
    assert sample_value(metrics, "macula_batch_size_bucket", model="demo", le="2.0") == 0
    assert sample_value(metrics, "macula_top1_confidence_bucket", model="demo", le="0.99") == 1
    assert sample_value(metrics, "macula_top1_confidence_bucket", model="demo", le="0.95") == 0
    assert sample_value(metrics, "macula_images_total", model="demo") == 1
    assert sample_value(metrics, "macula_queue_depth", model="demo") == 3
    assert sample_value(metrics, "macula_model_info", name="demo", version="0123456789ab", arch="resnet20",
                        attention="cbam") == 1
    assert sample_value(metrics, "macula_ready") == 1
    assert sample_value(metrics, "macula_inflight_requests") == 0
    assert sample_value(metrics, "macula_audit_records_written_total") == 2
    assert sample_value(metrics, "macula_audit_write_failures_total") == 1


def test_buckets_match_the_spec():
    metrics = exercised()
    batch = sorted(float(s.labels["le"]) for s in families(metrics)["macula_batch_size"].samples
                   if s.name.endswith("_bucket"))
    assert batch == [*map(float, BATCH_SIZE_BUCKETS), float("inf")]
    assert CONFIDENCE_BUCKETS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
    durations = [float(s.labels["le"]) for s in families(metrics)["macula_request_duration_seconds"].samples
                 if s.name.endswith("_bucket")]
    assert min(durations) <= 0.001 and 30.0 in durations


@pytest.mark.parametrize("metrics_factory", [Metrics, exercised], ids=["fresh", "exercised"])
def test_promtool_accepts_the_output(metrics_factory):
    body, _ = metrics_factory().render()
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_each_instance_has_its_own_registry():
    first, second = Metrics(), Metrics()
    first.reject("overload")
    assert sample_value(first, "macula_rejections_total", reason="overload") == 1
    assert sample_value(second, "macula_rejections_total", reason="overload") is None


def test_unknown_rejection_reasons_become_other():
    metrics = Metrics()
    for reason in [*REJECTION_REASONS, "made-up", "'; DROP TABLE", "overload"]:
        metrics.reject(reason)
    reasons = {s.labels["reason"]: s.value for s in families(metrics)["macula_rejections"].samples
               if s.name == "macula_rejections_total"}
    assert set(reasons) == REJECTION_REASONS | {OTHER}
    assert reasons["overload"] == 2 and reasons[OTHER] == 2


def test_route_method_and_status_labels_are_bounded():
    metrics = Metrics(routes=["/v1/predict", "/healthz"])
    metrics.observe_request("/v1/predict", "post", 200, 0.01)
    metrics.observe_request("/wp-admin/../../etc/passwd", "POST", 404, 0.001)
    metrics.observe_request(None, "BREW", 404, 0.001)
    metrics.observe_request("/healthz", "GET", 999, 0.001)
    labels = {(s.labels["route"], s.labels["method"], s.labels["status"])
              for s in families(metrics)["macula_requests"].samples if s.name == "macula_requests_total"}
    assert labels == {("/v1/predict", "POST", "200"), (OTHER, "POST", "404"), ("unmatched", OTHER, "404"),
                      ("/healthz", "GET", OTHER)}


def test_model_info_is_replaced_when_a_model_is_reloaded():
    metrics = Metrics()
    metrics.set_model_info("demo", "aaaaaaaaaaaa", "resnet20", "cbam")
    metrics.set_model_info("demo", "bbbbbbbbbbbb", "resnet20", "cbam")
    metrics.set_model_info("plain", "cccccccccccc", "resnet18", None)
    info = {(s.labels["name"], s.labels["version"], s.labels["attention"])
            for s in families(metrics)["macula_model_info"].samples}
    assert info == {("demo", "bbbbbbbbbbbb", "cbam"), ("plain", "cccccccccccc", "none")}
    metrics.remove_model("plain")
    assert {s.labels["name"] for s in families(metrics)["macula_model_info"].samples} == {"demo"}


def test_inflight_gauge_counts_requests_in_progress():
    metrics = Metrics()
    with metrics.track_inflight(), metrics.track_inflight():
        assert sample_value(metrics, "macula_inflight_requests") == 2
    assert sample_value(metrics, "macula_inflight_requests") == 0


def test_gpu_memory_is_reported_only_when_cuda_is_in_use():
    metrics = Metrics()
    metrics.update_gpu_memory()
    in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    assert bool(families(metrics)["macula_gpu_memory_bytes"].samples) == in_use


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_reports_allocated_and_reserved():
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    metrics = Metrics()
    allocated = sample_value(metrics, "macula_gpu_memory_bytes", device="cuda:0", kind="allocated")
    reserved = sample_value(metrics, "macula_gpu_memory_bytes", device="cuda:0", kind="reserved")
    assert allocated is not None and allocated >= block.numel()
    assert reserved is not None and reserved >= allocated
    body, _ = metrics.render()
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
