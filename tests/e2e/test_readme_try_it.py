"""The README's "Try it" commands, run exactly as written against a live ``python -m service`` on the demo model.

How "exactly" is kept while staying robust:

- The server is the command ``make serve`` runs (``python -m service --model-dir model_store``), on a free port
  rather than 8000: a developer's own ``make serve``, or a second test run, may hold 8000 already.
- The block is taken from the README at run time (the first ``bash`` block after the ``## Try it`` heading), and
  the one substitution made is the address: every ``127.0.0.1:8000`` becomes ``127.0.0.1:PORT``. The test first
  checks that the block names no other address and has no ``<placeholder>``, so nothing else needs filling in.
- It runs as one ``bash -euo pipefail`` script in a scratch directory that holds only ``examples`` (a link to the
  repository's) and ``.venv`` (a link to the environment running the tests, which is the repository's ``.venv``
  under ``make test``): the commands see the paths they expect from the repository root, and the files they
  write (the overlays) land in the scratch directory instead of the clone.
- Then it checks what the commands printed and wrote: the right digit, the overlays, the audit record, the metric.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.integration.live_stack import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ADDRESS = "127.0.0.1:8000"


def try_it_block() -> str:
    text = README.read_text()
    match = re.search(r"^## Try it\n.*?^```bash\n(.*?)^```", text, re.M | re.S)
    assert match, "README.md has no '## Try it' section with a ```bash block"
    return match.group(1)



@contextlib.contextmanager
def demo_service(workdir: Path) -> Iterator[int]:
    """``python -m service --model-dir model_store`` (what ``make serve`` runs) on a free port, once ready."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MACULA_AUDIT_DB": str(workdir / "audit.db")}
    with (workdir / "service.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--model-dir", "model_store", "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, (workdir / "service.log").read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "the service did not become ready in 120 s"
                time.sleep(0.2)
            yield port
        finally:
            process.terminate()
            process.wait(30)


def test_readme_try_it_block_needs_no_editing() -> None:
    block = try_it_block()
    assert ADDRESS in block
    assert not re.search(r"<[^>]*>", block), "a <placeholder> the reader would have to fill in"
    other = set(re.findall(r"(?:localhost|\d+\.\d+\.\d+\.\d+)(?::\d+)?", block)) - {ADDRESS}
    assert not other, f"addresses other than {ADDRESS}: {other}"
    assert not re.search(r"^\s*(open|xdg-open)\s", block, re.M), "opening a browser is not a command to run"


def test_readme_links_stay_in_the_repository() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        assert not re.match(r"[a-z]+://", target), f"link out of the repository: {target}"
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"link to a file outside the clone: {target}"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's commands need curl")
def test_readme_try_it_commands_run_verbatim(tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    (work / ".venv").symlink_to(Path(sys.prefix))
    with demo_service(tmp_path) as port:
        script = try_it_block().replace(ADDRESS, f"127.0.0.1:{port}")
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True,
                             timeout=180)
    out = run.stdout
    assert run.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    assert '"code"' not in out, out[-3000:]  # no error body anywhere
    # the raw-PNG curl: digit-7.png's top label first
    assert re.search(r'"label": "(\w+)"', out).group(1) == "7", out[:2000]
    # the client on digit-7.png: its id line, then 7 on top
    assert re.search(r"^prediction \w+ by demo .*\n\s+7\s+0\.\d+$", out, re.M), out
    for name, size in (("digit-7-attention.png", (384, 384)), ("cat-attention.png", (384, 256))):
        with Image.open(work / name) as overlay:
            assert (overlay.format, overlay.size) == ("PNG", size), name
    # the audit record, masks included
    assert re.search(r'"module": "layer3\.2\.cbam"', out) and '"png": "' in out, out[-3000:]
    # the metrics line: this run classified at least the four images above
    (count,) = re.findall(r'^macula_images_total\{model="demo"\} (\S+)$', out, re.M)
    assert float(count) >= 4
