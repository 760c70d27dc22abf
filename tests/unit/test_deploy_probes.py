"""Every HTTP path the deployment files call (health checks, probes, scrape path) is a GET route of the app."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK_URL_PATH = re.compile(r"http://127\.0\.0\.1:[^/]+(/[\w/.-]*)")


@pytest.fixture(scope="module")
def get_routes(tmp_path_factory) -> set[str]:
    """GET paths of the app as built by create_app, from its OpenAPI schema (lifespan not started: no model loaded)."""
    settings = Settings(model_dir=tmp_path_factory.mktemp("models"), audit_db="")
    return {path for path, operations in create_app(settings).openapi()["paths"].items() if "get" in operations}


def k8s_container() -> dict:
    deployment = yaml.safe_load((ROOT / "deploy/k8s/deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_app_serves_the_contract_probe_routes(get_routes):
    assert {"/healthz", "/readyz", "/metrics"} <= get_routes


def test_dockerfile_healthcheck_path_is_a_route(get_routes):
    healthcheck = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if "CMD [" in line)
    paths = LOOPBACK_URL_PATH.findall(healthcheck.replace("' + os.environ.get('MACULA_PORT', '8000') + '", "8000"))
    assert paths == ["/healthz"]
    assert set(paths) <= get_routes


def test_compose_healthcheck_path_is_a_route(get_routes):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = " ".join(compose["services"]["macula"]["healthcheck"]["test"])
    paths = LOOPBACK_URL_PATH.findall(command)
    assert paths == ["/healthz"]
    assert set(paths) <= get_routes


def test_k8s_probe_paths_are_routes(get_routes):
    container = k8s_container()
    probes = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes == {"/readyz", "/healthz"}
    assert probes <= get_routes


def test_scrape_paths_are_routes(get_routes):
    annotations = yaml.safe_load((ROOT / "deploy/k8s/deployment.yaml").read_text()
                                 )["spec"]["template"]["metadata"]["annotations"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    macula_job = next(job for job in config["scrape_configs"] if job["job_name"] == "macula")
    assert {annotations["prometheus.io/path"], macula_job["metrics_path"]} == {"/metrics"}
    assert "/metrics" in get_routes


def test_probe_routes_need_no_api_key(tmp_path):
    """Probes and scrapes carry no credentials: with MACULA_API_KEY set they must still answer."""
    from fastapi.testclient import TestClient

    app = create_app(Settings(model_dir=tmp_path, audit_db="", api_key="secret"))
    client = TestClient(app)  # no `with`: lifespan not started, so no model loading is involved
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/readyz").status_code == 503  # not ready (never started), but not 401
    assert client.get("/v1/models").status_code == 401
