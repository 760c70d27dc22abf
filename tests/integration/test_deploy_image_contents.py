"""The builder stage's `pip install .`, done here on exactly the files the Dockerfile copies: the wheel builds
from that context alone, carries the three packages and nothing else, and `python -m service` runs from it
without the repository on the path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def copied_sources() -> list[str]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    return sources


def build_context(target: Path) -> Path:
    """The COPY sources, minus what .dockerignore's simple patterns exclude (caches, compiled files)."""
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for source in copied_sources():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, target / source, ignore=ignore)
        else:
            shutil.copy(path, target / source)
    return target


def test_the_image_install_builds_from_the_docker_context_and_runs(tmp_path):
    context = build_context(tmp_path / "context")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp_path / "dist"), str(context)], check=True, capture_output=True, timeout=180)
    (wheel,) = (tmp_path / "dist").glob("macula-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
        assert top_level == {"models", "service", "training"}
        archive.extractall(tmp_path / "site")

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    where = subprocess.run([sys.executable, "-c", "import json, models, service, training; "
                            "print(json.dumps([m.__file__ for m in (models, service, training)]))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert all(path.startswith(str(tmp_path / "site")) for path in json.loads(where.stdout))
    usage = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    assert "--model-dir" in usage.stdout and "--drain-timeout-s" in usage.stdout
