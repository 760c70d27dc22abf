"""``bench.servers.launch.RunningServer``: waits for the ready URL, times it, reports a server that dies first."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.servers.launch import Launch, RunningServer
from tests.integration.live_stack import free_port


def test_ready_time_is_measured_and_the_server_stopped_on_exit(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    launch = Launch([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], url, url, cwd=tmp_path)
    with RunningServer(launch, tmp_path / "server.log", poll_s=0.05, ready_timeout_s=60) as server:
        assert server.ready_s is not None and 0 < server.ready_s < 60
        proc = server.proc
    assert proc.poll() is not None


def test_a_server_that_exits_before_ready_is_reported_with_its_log(tmp_path: Path) -> None:
    launch = Launch([sys.executable, "-c", "print('no model here'); raise SystemExit(3)"], "http://127.0.0.1:9/",
                    "http://127.0.0.1:9/")
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*no model here"):
        RunningServer(launch, tmp_path / "server.log", poll_s=0.05, ready_timeout_s=60).__enter__()
