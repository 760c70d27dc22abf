"""The monitoring stack against the real service: the app (create_app) serves a checkpoint on a loopback port,
real requests go through it, and then

- its /metrics passes ``promtool check metrics`` and contains every metric the dashboard and the alerts use;
- a real Prometheus (Debian binary) scrapes it with deploy/prometheus/alerts.yml loaded: every alert rule
  evaluates without error, every dashboard query runs, and the key panels have data.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from live_stack import prometheus, query, running_service, wait_until
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "macula.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\bmacula_[a-z0-9_]+")
CUDA_ONLY = {"macula_gpu_memory_bytes"}
DETECTOR_ONLY = {"macula_unfamiliar_inputs_total"}  # the stack's checkpoint carries no unfamiliar-input detector
CLIENT_OK = 'sum(macula_requests_total{status="200", route!~"/healthz|/readyz|/metrics"})'


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((40, 36), 40 + seed).convert("L").save(buffer, format="PNG")
    return buffer.getvalue()


def send_traffic(base: str) -> None:
    """Successful predictions (concurrent, so batches form) and one of each common client error."""
    with httpx.Client(base_url=base, timeout=30) as client:
        def predict(i: int) -> httpx.Response:
            return client.post("/v1/predict", files=[("file", (f"{i}.png", png(i), "image/png"))] * 2)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(predict, range(6)))
        assert [a.status_code for a in answers] == [200] * 6
        named = client.post("/v1/models/demo/predict", content=png(9), headers={"Content-Type": "image/png"})
        assert named.status_code == 200
        assert client.get(f"/v1/predictions/{named.json()['id']}").status_code == 200
        as_png = {"Content-Type": "image/png"}
        assert client.post("/v1/predict", content=b"GIF89a", headers={"Content-Type": "image/gif"}).status_code == 415
        assert client.post("/v1/models/nope/predict", content=png(1), headers=as_png).status_code == 404
        assert client.post("/v1/predict", content=b"not a png", headers=as_png).status_code == 422


def used_metric_names() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return {name for expr in exprs for name in METRIC.findall(expr)}


def dashboard_queries() -> dict[str, list[str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: [t["expr"].replace("$__rate_interval", "30s").replace("$__range", "5m")
                         .replace("$instance", ".*")
                         .replace("$model", ".*") for t in p["targets"]] for p in panels}


@pytest.fixture(scope="module")
def stack(gray_checkpoint, tmp_path_factory) -> Iterator[dict]:
    """The service after traffic, scraped by Prometheus for a few seconds."""
    models = tmp_path_factory.mktemp("model_store")
    shutil.copy(gray_checkpoint, models / "demo.safetensors")
    work = tmp_path_factory.mktemp("stack")
    with running_service(models, work / "audit.db") as target:
        base = f"http://{target}"
        with prometheus([target], work, rule_files=[ALERTS]) as prom:
            wait_until(lambda: query(prom, "up")[0]["value"][1] == "1", 20, "the first scrape")
            send_traffic(base)
            time.sleep(2)  # at least one scrape between the two waves, so rates are positive
            send_traffic(base)
            wait_until(lambda: float(query(prom, CLIENT_OK)[0]["value"][1]) >= 16,
                       20, "the second wave in Prometheus")
            time.sleep(1.5)
            yield {"base": base, "prometheus": prom, "scrape": httpx.get(f"{base}/metrics", timeout=5).text}


def test_scrape_passes_promtool_check_metrics(stack):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (make system-deps)"
    result = subprocess.run([promtool, "check", "metrics"], input=stack["scrape"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_dashboard_and_alerts_use_is_scraped(stack):
    scraped = {s.name for family in text_string_to_metric_families(stack["scrape"]) for s in family.samples}
    expected = used_metric_names() - (set() if torch.cuda.is_available() else CUDA_ONLY) - DETECTOR_ONLY
    assert expected - scraped == set()
    assert len(expected) >= 12


def test_prometheus_loaded_every_alert_rule_and_evaluates_it_cleanly(stack):
    def evaluated_rules() -> list[dict]:
        groups = httpx.get(f"{stack['prometheus']}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["lastEvaluation"] > "2000" for r in rules) else []

    rules = wait_until(evaluated_rules, 10, "every rule evaluated")
    alerts = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    assert {rule["name"] for rule in rules} == alerts
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_alerts_react_to_the_live_traffic(stack):
    """3 of every 11 client requests were 4xx (27% > 20%): that alert is pending (its `for:` is 15 min);
    nothing fires, and the 5xx alert, with no 5xx at all, stays silent."""
    pending = 'ALERTS{alertname="MaculaHigh4xxRatio", alertstate="pending"}'
    wait_until(lambda: query(stack["prometheus"], pending), 15, "the 4xx-ratio alert to be pending")
    assert query(stack["prometheus"], 'ALERTS{alertstate="firing"}') == []
    assert query(stack["prometheus"], 'ALERTS{alertname="MaculaHigh5xxRatio"}') == []


def test_every_dashboard_query_runs_and_the_key_panels_have_data(stack):
    results = {title: [query(stack["prometheus"], expr) for expr in exprs]
               for title, exprs in dashboard_queries().items()}
    statuses = {r["metric"]["status"] for r in results["Request rate by status"][0]}
    assert {"200", "404", "415", "422"} <= statuses
    reasons = {r["metric"]["reason"] for r in results["Rejections by reason"][0]}
    assert {"unsupported_format", "not_found", "bad_input"} <= reasons
    assert results["Readiness"][0][0]["value"][1] == "1"
    assert results["Models served"][0][0]["metric"]["name"] == "demo"
    for title in ("Batch size distribution", "Top-1 confidence distribution"):
        buckets = {r["metric"]["le"]: float(r["value"][1]) for r in results[title][0]}
        assert "+Inf" in buckets and buckets["+Inf"] > 0, title
    p99 = float(results["Request latency p50 / p95 / p99"][2][0]["value"][1])
    assert 0 < p99 < 30
    if torch.cuda.is_available():
        assert results["GPU memory"][0], "no GPU memory series on a CUDA device"
