"""Prometheus config, alert rules and the Grafana dashboard: promtool-valid, and built only from real metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.audit.metrics import AuditMetrics
from service.metrics import REJECTION_REASONS, Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "macula.json"
METRIC = re.compile(r"\bmacula_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}
# Labels every scraped series gets from Prometheus, and the histogram bucket label.
TARGET_LABELS = {"instance", "job", "le"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool missing: apt-get install prometheus (make system-deps)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def service_metrics() -> tuple[Metrics, AuditMetrics]:
    """The service's metrics and its audit store's, in one registry as the app builds them."""
    metrics = Metrics()
    return metrics, AuditMetrics(metrics.registry, "sqlite")


def exported_series() -> set[str]:
    """Every sample name the service can export (a live scrape is checked in tests/integration)."""
    registry = service_metrics()[0].registry
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def metric_labels() -> dict[str, set[str]]:
    """Family name → label names. prometheus_client has no public accessor for a metric's label names."""
    every = [m for group in service_metrics() for m in vars(group).values()]
    return {m._name: set(m._labelnames) for m in every if hasattr(m, "_labelnames")}


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    monitor = text[text.index("## Monitor"):text.index("## Upgrade a model")]
    return set(METRIC.findall(monitor))


# ---------------------------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_config():
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_alert_unit_tests_pass():
    result = promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts_tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert len(alerts_tested) >= 2


def test_the_alert_unit_tests_can_fail(tmp_path):
    """A rule changed under the unit tests breaks them: the tests above are not vacuous."""
    rules = (PROMETHEUS / "alerts.yml").read_text().replace("> 0.01", "> 0.5")
    (tmp_path / "alerts.yml").write_text(rules)
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS / "alerts_test.yml").read_text())
    result = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode != 0 and "MaculaHigh5xxRatio" in result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path):
    """Grafana's variables replaced by what they expand to, each query checked as a recording rule."""
    def concrete(expr: str) -> str:
        return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*")
                .replace("$model", ".*"))

    rules = [{"record": f"macula:dashboard_query_{i}", "expr": concrete(e)} for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- metric names


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_used_is_defined_by_the_service_and_documented(source):
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used
    assert used - set(exported_series()) == set()
    families = {name.removesuffix(s) for name in used for s in ("_bucket", "_count", "_sum")
                if name.endswith(s)} | {name for name in used if not name.endswith(("_bucket", "_count", "_sum"))}
    assert families - documented_metrics() == set()


def test_the_documented_metrics_are_the_services_metrics():
    documented = documented_metrics()
    defined = {name for name in exported_series() if not name.endswith(("_bucket", "_count", "_sum", "_created"))}
    defined |= {name.removesuffix("_bucket") for name in exported_series() if name.endswith("_bucket")}
    assert documented == defined


def test_every_label_used_exists_on_its_metric():
    labels = metric_labels()
    for expr in dashboard_exprs() + alert_exprs():
        for name, selector in re.findall(r"\b(macula_[a-z0-9_]+)\{([^}]*)\}", expr):
            family = re.sub(r"_(bucket|count|sum|total)$", "", name)
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            assert used <= labels[family] | TARGET_LABELS, (expr, used - labels[family])
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            families = [re.sub(r"_(bucket|count|sum|total)$", "", n) for n in METRIC.findall(expr)]
            allowed = set().union(*(labels[f] for f in families)) | TARGET_LABELS
            assert {g.strip() for g in group.split(",")} <= allowed, expr


def test_alerted_rejection_reasons_are_real_reasons():
    reasons = {r for expr in alert_exprs() for r in re.findall(r'reason="(\w+)"', expr)}
    assert reasons and reasons <= REJECTION_REASONS


# ---------------------------------------------------------------------------------------------- dashboard

REQUIRED_PANELS = {
    "Request rate by status": "macula_requests_total",
    "Request latency p50 / p95 / p99": "macula_request_duration_seconds_bucket",
    "Queue wait p50 / p95 / p99": "macula_queue_wait_seconds_bucket",
    "Batch size distribution": "macula_batch_size_bucket",
    "Inference time per batch p50 / p95 / p99": "macula_inference_duration_seconds_bucket",
    "Queue depth": "macula_queue_depth",
    "Rejections by reason": "macula_rejections_total",
    "Top-1 confidence distribution": "macula_top1_confidence_bucket",
    "GPU memory": "macula_gpu_memory_bytes",
    "Readiness": "macula_ready",
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_json_is_the_generators_output(dashboard):
    sys.path.insert(0, str(DASHBOARD.parents[1]))
    try:
        import make_dashboard
    finally:
        sys.path.pop(0)
    assert dashboard == make_dashboard.dashboard(), "run: python deploy/grafana/make_dashboard.py"


def test_dashboard_is_well_formed_grafana_json(dashboard):
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasource_uid = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
                                    )["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat", "table", "heatmap"}
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource_uid


def test_dashboard_panels_do_not_overlap(dashboard):
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, panel["title"]
        cells |= area


def test_dashboard_has_the_required_panels(dashboard):
    by_title = {panel["title"]: panel for panel in dashboard["panels"]}
    for title, metric in REQUIRED_PANELS.items():
        assert metric in " ".join(t["expr"] for t in by_title[title]["targets"]), title
    assert by_title["Top-1 confidence distribution"]["type"] == "heatmap"
    assert by_title["Rejections by reason"]["targets"][0]["expr"].startswith("sum by (reason)")
    assert by_title["Request rate by status"]["targets"][0]["expr"].startswith("sum by (status)")
