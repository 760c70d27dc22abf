"""deploy/kserve: the InferenceService names real routes, ports, settings, and the Dockerfile's image."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
import yaml

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
KSERVE_MODEL_MOUNT = "/mnt/models"  # where KServe mounts STORAGE_URI for the container named kserve-container
KSERVE_ENV = {"STORAGE_URI", "PROTOCOL", "HOME"}  # read by KServe (and the OS), not by the service
V2_ROUTES = ["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
             "/v2/models/{name}/infer"]  # the contract's Open Inference Protocol routes


@pytest.fixture(scope="module")
def isvc() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def predictor(isvc) -> dict:
    return isvc["spec"]["predictor"]


@pytest.fixture(scope="module")
def container(predictor) -> dict:
    (only,) = predictor["containers"]
    return only


@pytest.fixture(scope="module")
def env(container) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


@pytest.fixture(scope="module")
def get_routes(tmp_path_factory) -> set[str]:
    """GET paths of the app as create_app builds it (lifespan not started: no model loaded)."""
    settings = Settings(model_dir=tmp_path_factory.mktemp("models"), audit_db="")
    return {path for path, operations in create_app(settings).openapi()["paths"].items() if "get" in operations}


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_is_a_custom_predictor_kserve_recognises(isvc, container):
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert container["name"] == "kserve-container"
    assert "command" not in container and "args" not in container  # the image's ENTRYPOINT: python -m service
    assert 'ENTRYPOINT ["python", "-m", "service"]' in dockerfile()
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_speaks_v2_and_serves_the_model_store_pvc(env, container):
    assert env["PROTOCOL"] == "v2"
    pvc = yaml.safe_load((ROOT / "deploy" / "k8s" / "model-store-pvc.yaml").read_text())
    assert env["STORAGE_URI"] == f"pvc://{pvc['metadata']['name']}/"
    assert env["MACULA_MODEL_DIR"] == KSERVE_MODEL_MOUNT
    assert all(m["mountPath"] != KSERVE_MODEL_MOUNT for m in container["volumeMounts"])  # KServe adds that mount


def test_the_default_model_is_the_inference_service_name(isvc, env):
    """KServe's transformers and graphs call /v2/models/<isvc name>/...: that name must be a served model."""
    name = isvc["metadata"]["name"]
    assert env["MACULA_DEFAULT_MODEL"] == name
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)  # a Kubernetes name, and a file stem


def test_one_port_everywhere(isvc, container, env):
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["MACULA_PORT"])
    assert f"EXPOSE {port['containerPort']}" in dockerfile()
    assert env["MACULA_HOST"] == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["containerPort"]
    assert int(isvc["metadata"]["annotations"]["prometheus.kserve.io/port"]) == port["containerPort"]


def test_probes_and_metrics_are_routes_of_the_app(isvc, container, get_routes):
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"  # the protocol's server ready
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert isvc["metadata"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert {"/v2/health/ready", "/v2/health/live", "/metrics"} <= get_routes


def test_probes_need_no_api_key_and_readiness_waits_for_the_models(container, tmp_path):
    """Kubelet sends no key: with one set, the probes still answer (503 before the lifespan loads the models)."""
    app = create_app(Settings(model_dir=tmp_path, audit_db="", api_key="secret"))

    async def probe() -> list[int]:  # no lifespan: the app as it is before its models are loaded
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pod") as client:
            paths = [container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")]
            return [(await client.get(path)).status_code for path in [*paths, "/v2/models/cbam-resnet50"]]

    assert asyncio.run(probe()) == [200, 503, 401]


def test_v2_paths_named_in_the_manifest_are_contract_routes(isvc):
    named = set(re.findall(r"(/v2[\w/.{}-]*)", MANIFEST.read_text()))
    assert named, "the manifest says which v2 routes KServe calls"
    patterns = [re.compile(re.sub(r"\\\{name\\\}", r"[a-z0-9-]+", re.escape(route)) + r"/?") for route in V2_ROUTES]
    for path in named:
        assert any(p.fullmatch(path.replace("{name}", isvc["metadata"]["name"])) for p in patterns), path
    assert f"/v2/models/{isvc['metadata']['name']}/infer" in named


def test_env_names_are_settings_fields(env):
    fields = {f"MACULA_{name.upper()}" for name in Settings.model_fields}
    assert set(env) - KSERVE_ENV <= fields
    assert Settings(**{k[len("MACULA_"):].lower(): v for k, v in env.items() if k.startswith("MACULA_")})


def test_grace_period_outlasts_prestop_pause_plus_drain(predictor, container, env):
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert predictor["terminationGracePeriodSeconds"] > float(pre_stop[1]) + float(env["MACULA_DRAIN_TIMEOUT_S"])


def test_non_root_read_only_root_with_writable_audit_and_tmp(predictor, container, env):
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert f"ARG UID={predictor['securityContext']['runAsUser']}" in dockerfile()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in predictor["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in (str(Path(env["MACULA_AUDIT_DB"]).parent), env["HOME"]):
        assert "emptyDir" in volumes[mounts[path]["name"]] and not mounts[path].get("readOnly")
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert int(env["MACULA_TORCH_THREADS"]) == int(container["resources"]["requests"]["cpu"])
