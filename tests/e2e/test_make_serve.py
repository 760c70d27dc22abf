"""``make serve`` ends with status 0 when the service is stopped with SIGTERM or SIGINT and drains cleanly.

Each test runs the real ``make serve`` (on a free port, with ``-o .venv/.installed`` so that make does not
reinstall the project into a venv that is already installed) in a session of its own, waits for ``/readyz``,
signals it, and checks make's exit status and what make printed. Where the signal goes matters:

- to the service alone (``kill PID``, a process supervisor): make's status is the service's, which must be 0;
- to the whole process group, as Ctrl-C in a terminal does: make receives the SIGINT too and, by GNU make's
  own convention, ends itself by it once its recipe has finished. The service must still exit 0, which make
  shows by printing no ``*** [serve] Interrupt`` line.

The children start with SIGINT at its default disposition: a shell that runs the tests in the background would
otherwise hand them SIGINT ignored, and Ctrl-C would prove nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.live_stack import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]



def start_make_serve(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """``make serve`` in a new session (make is the group leader); returns it and its service's pid once ready."""
    port = free_port()
    env = {**os.environ, "MACULA_AUDIT_DB": str(tmp_path / "audit.db"), "MACULA_DEVICE": "cpu"}
    make = subprocess.Popen(["make", "--no-print-directory", "-o", ".venv/.installed", "serve", f"PORT={port}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while True:
        assert make.poll() is None, make.stdout.read()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        assert time.monotonic() < deadline, "make serve did not become ready in 120 s"
        time.sleep(0.2)
    children = children_of(make.pid)
    assert len(children) == 1, children  # make runs the recipe's one command directly, without a shell
    return make, children[0]


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc (no procps needed)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def stop(make: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = make.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
    return make.returncode, output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_make_serve_exits_0_when_the_service_is_signalled(tmp_path: Path, sig: signal.Signals) -> None:
    make, service = start_make_serve(tmp_path)
    os.kill(service, sig)
    returncode, output = stop(make)
    assert returncode == 0, output[-3000:]
    assert "Application shutdown complete" in output and "***" not in output, output[-3000:]


def test_ctrl_c_on_make_serve_drains_and_the_service_exits_0(tmp_path: Path) -> None:
    make, _ = start_make_serve(tmp_path)
    os.killpg(make.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    returncode, output = stop(make)
    assert "Application shutdown complete" in output and "Traceback" not in output, output[-3000:]
    assert "***" not in output, output[-3000:]  # make names a recipe that failed or died by a signal
    assert returncode in (0, -signal.SIGINT)  # make's own status: its convention for being interrupted itself
