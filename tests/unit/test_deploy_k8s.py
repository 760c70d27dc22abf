"""deploy/k8s manifests, structurally: kinds and apiVersions, probes, shutdown timing, wiring between objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
API_VERSIONS = {"Deployment": "apps/v1", "Service": "v1", "HorizontalPodAutoscaler": "autoscaling/v2",
                "PersistentVolumeClaim": "v1", "Secret": "v1", "Kustomization": "kustomize.config.k8s.io/v1beta1"}


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    """Every object listed by deploy/k8s/kustomization.yaml, by kind."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found: dict[str, dict] = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def pod(objects) -> dict:
    return objects["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (only,) = pod["spec"]["containers"]
    return only


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container["env"]}


def test_every_yaml_in_the_directory_is_applied(objects):
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Secret"}


def test_kinds_have_their_api_versions(objects):
    for kind, obj in objects.items():
        assert obj["apiVersion"] == API_VERSIONS[kind], kind
        assert obj["metadata"]["name"].startswith("macula")


def test_probes_use_readyz_and_healthz_on_the_container_port(container):
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    assert port_names["http"] == int(env_of(container)["MACULA_PORT"])
    assert env_of(container)["MACULA_HOST"] == "0.0.0.0"


def test_every_probe_has_an_explicit_timeout_shorter_than_its_period(container):
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        timeout = container[probe].get("timeoutSeconds")
        assert timeout is not None and 2 <= timeout < container[probe]["periodSeconds"], probe


def test_grace_period_outlasts_prestop_pause_plus_drain(pod, container):
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env_of(container).get("MACULA_DRAIN_TIMEOUT_S") or Settings.model_fields["drain_timeout_s"].default)
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain


def test_env_names_are_settings_fields(container):
    fields = {f"MACULA_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in env_of(container) if name.startswith("MACULA_")} <= fields


def test_requests_resources_and_runs_as_non_root(pod, container):
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the Dockerfile's UID
    assert "ARG UID=10001" in (ROOT / "Dockerfile").read_text()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_model_store_volume_is_the_pvc_mounted_read_only(objects, pod, container):
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values())
    models = mounts[env_of(container)["MACULA_MODEL_DIR"]]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert "/data" in mounts and not mounts["/data"].get("readOnly")   # the image's working directory


def test_every_replica_uses_the_shared_audit_store_from_the_secret(objects, container):
    """N replicas, one PostgreSQL: the URL (with its password) comes from the Secret, never from the manifest."""
    (source,) = [item["valueFrom"] for item in container["env"] if item["name"] == "MACULA_AUDIT_URL"]
    ref = source["secretKeyRef"]
    secret = objects["Secret"]
    assert ref["name"] == secret["metadata"]["name"]
    assert secret["stringData"][ref["key"]].startswith("postgresql://")
    assert objects["Deployment"]["spec"]["replicas"] >= 2
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert env_of(container)["MACULA_AUDIT_DURABLE"] in ("true", "false")


def test_prometheus_scrape_annotations_point_at_metrics(pod, container):
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]


def test_service_selects_the_pods_and_targets_the_named_port(objects, pod, container):
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}


def test_hpa_scales_the_deployment(objects):
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objects["Deployment"]["metadata"]["name"])
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert hpa["metrics"]


def test_gpu_overlay_adds_one_gpu_and_the_cuda_image():
    overlay = ROOT / "deploy" / "k8s-gpu"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert (overlay / kustomization["resources"][0]).resolve() == K8S
    patch = yaml.safe_load((overlay / "gpu-patch.yaml").read_text())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["MACULA_DEVICE"] == "cuda"
    assert kustomization["images"][0]["newTag"] == "cuda"
