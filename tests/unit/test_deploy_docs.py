"""docs/operations.md stays in sync with the settings and the deployment files."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "operations.md").read_text()
VARIABLE = re.compile(r"\bMACULA_[A-Z0-9_]+")
CONTAINER_ONLY = {"MACULA_PUBLISH_ADDR", "MACULA_TORCH_INDEX_URL"}  # compose variables, not service settings


def section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:] if end < 0 else DOC[start:end]


def settings_variables() -> set[str]:
    return {f"MACULA_{name.upper()}" for name in Settings.model_fields}


def configure_table_rows() -> dict[str, str]:
    """`| MACULA_X | default | meaning |` rows of the Configure table, by variable."""
    rows = re.findall(r"^\| `(MACULA_[A-Z0-9_]+)` \|(.*)$", section("Configure"), flags=re.M)
    return dict(rows)


def test_every_setting_has_a_row_in_the_configure_table():
    rows = configure_table_rows()
    assert settings_variables() - set(rows) == set()


def test_the_configure_table_has_no_stale_rows():
    assert set(configure_table_rows()) - settings_variables() == set()


def test_documented_defaults_match_the_settings():
    rows = configure_table_rows()
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is None or isinstance(default, bool):
            continue
        shown = rows[f"MACULA_{name.upper()}"].split("|")[0]
        value = str(default) if not isinstance(default, float) or not default.is_integer() else str(int(default))
        assert f"`{value}`" in shown, (name, default, shown)


def test_every_variable_the_deployment_files_set_is_documented():
    files = ["Dockerfile", "docker-compose.yml", "docker-compose.replicas.yml", "deploy/k8s/deployment.yaml",
             "deploy/k8s-gpu/gpu-patch.yaml"]
    used = {v for f in files for v in VARIABLE.findall((ROOT / f).read_text())}
    assert used - settings_variables() - CONTAINER_ONLY == set()
    assert set(VARIABLE.findall(DOC)) >= CONTAINER_ONLY


def test_scale_section_explains_the_shared_audit_store():
    scale = section("Scale")
    assert "MACULA_AUDIT_URL" in scale and "advisory lock" in scale and "NFS" in scale
    assert "audit-db-secret.yaml" in scale and "AUDIT_DB_PASSWORD" in scale
    assert "docker-compose.replicas.yml" in scale and "kubectl apply -k deploy/k8s" in scale


def test_every_file_the_doc_names_exists():
    for path in set(re.findall(r"`((?:deploy|docs|tests)/[\w./-]+|docker-compose[\w.]*\.yml|Dockerfile)`", DOC)):
        if "*" not in path:
            assert (ROOT / path).exists(), path
