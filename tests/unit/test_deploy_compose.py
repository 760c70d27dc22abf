"""docker-compose.yml and its replicas override: services, ports, volumes, and the files they mount exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


class ComposeLoader(yaml.SafeLoader):
    """Compose's own merge tags (`!reset`, `!override`) on top of plain YAML."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node)
                              if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node))


def interpolate(text: str) -> str:
    """Compose variable interpolation with every variable unset: `${VAR:-default}` → default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def load_compose(name: str) -> dict:
    return yaml.load(interpolate((ROOT / name).read_text()), Loader=ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose("docker-compose.yml")


def test_compose_has_the_three_services(compose):
    assert set(compose["services"]) == {"macula", "prometheus", "grafana"}


def test_macula_is_published_on_loopback_port_8000_by_default(compose):
    macula = compose["services"]["macula"]
    assert macula["ports"] == ["127.0.0.1:8000:8000"]
    assert macula["build"]["context"] == "."


def test_model_store_is_mounted_read_only_at_the_images_model_dir(compose):
    volumes = compose["services"]["macula"]["volumes"]
    assert "./model_store:/models:ro" in volumes
    assert (ROOT / "model_store").is_dir()
    assert "MACULA_MODEL_DIR=/models" in (ROOT / "Dockerfile").read_text()
    # the audit database goes on a named volume, so it survives `docker compose down` (without -v)
    audit = [v for v in volumes if v.endswith(":/data")]
    assert audit and audit[0].split(":")[0] in compose["volumes"]


def test_macula_environment_names_are_settings(compose):
    fields = {f"MACULA_{name.upper()}" for name in Settings.model_fields}
    env = compose["services"]["macula"]["environment"]
    assert env and set(env) <= fields
    assert float(env["MACULA_DRAIN_TIMEOUT_S"]) < parse_seconds(compose["services"]["macula"]["stop_grace_period"])


def default(field: str):
    return Settings.model_fields[field].default


def parse_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return float(match[1])


def test_prometheus_mounts_its_config_and_rules(compose):
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert all((ROOT / "deploy/prometheus" / rules).is_file() for rules in config["rule_files"])
    macula_job = next(job for job in config["scrape_configs"] if job["job_name"] == "macula")
    assert macula_job["dns_sd_configs"][0]["names"] == ["macula"]
    assert macula_job["dns_sd_configs"][0]["port"] == 8000


def test_grafana_is_provisioned_without_clicks(compose):
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/macula.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == dashboards_dir
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/macula.json"
    assert (ROOT / "deploy/grafana/dashboards/macula.json").is_file()
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_every_bind_mount_source_exists(compose):
    replicas = load_compose("docker-compose.replicas.yml")
    for service in [*compose["services"].values(), *replicas["services"].values()]:
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


def test_replicas_override_puts_a_load_balancer_on_port_8000():
    replicas = load_compose("docker-compose.replicas.yml")["services"]
    assert replicas["macula"]["ports"] is None  # `!reset []`: replicas publish nothing, so --scale works
    assert replicas["lb"]["ports"] == ["127.0.0.1:8000:8000"]
    assert replicas["lb"]["depends_on"]["macula"]["condition"] == "service_healthy"


def test_load_balancer_lets_the_service_answer_413_itself():
    conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
    limit = re.search(r"client_max_body_size (\d+)m;", conf)
    assert limit and int(limit[1]) * 1024 * 1024 > default('max_body_bytes')
    timeout = re.search(r"proxy_read_timeout (\d+)s;", conf)
    assert timeout and int(timeout[1]) > default('request_timeout_s')
    assert "set $macula http://macula:8000;" in conf and "proxy_pass $macula;" in conf


def test_replicas_share_one_postgresql_audit_store():
    """Every replica writes the one trail in the override's postgres service, which they wait for."""
    replicas = load_compose("docker-compose.replicas.yml")
    macula, postgres = replicas["services"]["macula"], replicas["services"]["postgres"]
    url = macula["environment"]["MACULA_AUDIT_URL"]
    match = re.fullmatch(r"postgresql://(\w+):\$\{AUDIT_DB_PASSWORD:\?[^}]+\}@postgres:5432/(\w+)", url)
    assert match, url
    assert (match[1], match[2]) == (postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_DB"])
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${AUDIT_DB_PASSWORD:?")   # no default password
    assert macula["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert "ports" not in postgres                                       # reachable from the replicas only
    (volume,) = postgres["volumes"]
    assert volume.endswith(":/var/lib/postgresql/data") and volume.split(":")[0] in replicas["volumes"]
    assert "entrypoint" not in macula                                    # no per-replica SQLite files any more
    assert macula["environment"]["MACULA_AUDIT_DURABLE"] == "false"     # best-effort unless asked


def test_an_unset_api_key_means_no_authentication(compose, tmp_path):
    """Compose passes MACULA_API_KEY="" when the shell has none: the service must then stay open."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    key = compose["services"]["macula"]["environment"]["MACULA_API_KEY"]
    assert key == ""
    app = create_app(Settings(model_dir=tmp_path, audit_db="", api_key=key))
    assert TestClient(app).get("/v1/models").status_code != 401
