"""Run ``wrk`` against one URL and return its latency percentiles, throughput and its own CPU cost.

wrk is an event-loop C client: one thread drives all connections, so on a 2-core machine it leaves nearly
everything to the server under test. Its CPU time (user + sys, from ``os.wait4``'s rusage of the child)
is recorded with every run so that its share stays in view.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

LUA_SCRIPT = Path(__file__).with_name("post_image.lua")
MARKER = "WRK_JSON "


@dataclass
class WrkResult:
    concurrency: int
    duration_s: float
    requests: int
    req_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]
    wrk_cpu_s: float  # user + sys seconds the load generator itself used

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def wrk_cpu_share(self) -> float:
        """wrk's CPU seconds per wall second (1.0 = one full core)."""
        return self.wrk_cpu_s / self.duration_s if self.duration_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "error_count": self.error_count, "wrk_cpu_share": self.wrk_cpu_share}


def wrk_command(url: str, body: Path, *, concurrency: int, duration_s: float, content_type: str = "image/jpeg",
                timeout_s: float = 60.0, wrk: str = "wrk") -> list[str]:
    return [wrk, "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration_s))}s",
            "--timeout", f"{int(timeout_s)}s", "--latency", "-s", str(LUA_SCRIPT), url, "--", str(body), content_type]


def parse_output(stdout: str) -> dict:
    """The JSON line printed by the Lua ``done()``."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"wrk printed no {MARKER.strip()} line; output:\n{stdout[-2000:]}")


def run_wrk(url: str, body: Path, *, concurrency: int, duration_s: float, content_type: str = "image/jpeg",
            timeout_s: float = 60.0) -> WrkResult:
    """One wrk run of ``duration_s`` seconds with ``concurrency`` connections, each POSTing ``body``."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian package 'wrk'; see `make system-deps`)")
    cmd = wrk_command(url, body, concurrency=concurrency, duration_s=duration_s, content_type=content_type,
                      timeout_s=timeout_s, wrk=wrk)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{stdout[-2000:]}")
    data = parse_output(stdout)
    return WrkResult(concurrency=concurrency, duration_s=data["duration_s"], requests=data["requests"],
                     req_per_s=data["req_per_s"], p50_ms=data["p50_ms"], p90_ms=data["p90_ms"],
                     p95_ms=data["p95_ms"], p99_ms=data["p99_ms"], max_ms=data["max_ms"], mean_ms=data["mean_ms"],
                     errors=data["errors"], wrk_cpu_s=usage.ru_utime + usage.ru_stime)
