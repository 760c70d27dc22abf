"""Start one benchmarked server as a child process on loopback, wait until it is ready, stop it afterwards.

Each server runs in its own session (process group) so that stopping it also stops its workers (LitServe's
inference process, TorchServe's Java frontend and Python backend). ``SERVERS`` maps a name to its recipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.servers import torchserve_setup

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int
    max_batch_delay_ms: float


@dataclass
class Launch:
    """What to run and where to talk to it."""

    command: list[str]
    ready_url: str
    predict_url: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def naive(ckpt: Path, name: str, port: int, work: Path, batch: BatchConfig) -> Launch:
    base = f"http://127.0.0.1:{port}"
    return Launch(_python("bench.servers.naive_fastapi", "--checkpoint", str(ckpt), "--port", str(port)),
                  f"{base}/health", f"{base}/predict")


def litserve(ckpt: Path, name: str, port: int, work: Path, batch: BatchConfig) -> Launch:
    base = f"http://127.0.0.1:{port}"
    return Launch(_python("bench.servers.litserve_server", "--checkpoint", str(ckpt), "--port", str(port),
                          "--max-batch-size", str(batch.max_batch_size),
                          "--batch-timeout-ms", str(batch.max_batch_delay_ms)),
                  f"{base}/health", f"{base}/predict")


def torchserve(ckpt: Path, name: str, port: int, work: Path, batch: BatchConfig) -> Launch:
    store = torchserve_setup.build_model_store(ckpt, work, name=name, batch_size=batch.max_batch_size,
                                               batch_delay_ms=batch.max_batch_delay_ms)
    config = torchserve_setup.write_config(work, store, port)
    base = f"http://127.0.0.1:{port}"
    return Launch(torchserve_setup.serve_command(config, store, name), f"http://127.0.0.1:{port + 1}/models/{name}",
                  f"{base}/predictions/{name}", cwd=work)


# Unless MACULA_COMPILE=off, the compile cache is built first (python -m service.compile, as docs/operations.md
# advises for deploys): otherwise the service would build its compiled forms in the background during the run
# and the load would measure a mix of eager, compiling and compiled.
MACULA_START = ('if [ "${MACULA_COMPILE:-auto}" != off ]; then "$0" -m service.compile --model-dir "$1" >&2 || true; '
                'fi; exec "$0" -m service --model-dir "$1" --port "$2"')


def macula(ckpt: Path, name: str, port: int, work: Path, batch: BatchConfig) -> Launch:
    """Macula with its out-of-the-box settings (its own per-device batch defaults; MACULA_* env passes through),
    its compile cache built before it starts."""
    model_dir = work / "model_store"
    model_dir.mkdir(parents=True, exist_ok=True)
    link = model_dir / f"{name}.safetensors"
    link.unlink(missing_ok=True)
    link.symlink_to(ckpt.resolve())
    base = f"http://127.0.0.1:{port}"
    return Launch(["sh", "-c", MACULA_START, sys.executable, str(model_dir), str(port)],
                  f"{base}/readyz", f"{base}/v1/models/{name}/predict", cwd=work)


SERVERS: dict[str, Callable[[Path, str, int, Path, BatchConfig], Launch]] = {
    "naive": naive, "litserve": litserve, "torchserve": torchserve, "macula": macula}


def top1(server: str, answer: dict | list) -> int:
    """The top-1 class index from a server's JSON answer for one image."""
    if server == "macula":
        return int(answer["predictions"][0]["top_k"][0]["index"])
    return int(answer["top_k"][0]["index"])


class RunningServer:
    """``with RunningServer(launch, log) as server:`` starts it, waits for ``ready_url`` (polled every ``poll_s``),
    stops it on exit; ``ready_s`` is the time from the launch to the first 200."""

    def __init__(self, launch: Launch, log_path: Path, *, ready_timeout_s: float = 240.0, poll_s: float = 0.5
                 ) -> None:
        self.launch, self.log_path, self.ready_timeout_s, self.poll_s = launch, log_path, ready_timeout_s, poll_s
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> RunningServer:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               **self.launch.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.launch.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.launch.cwd or REPO, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        launched = time.monotonic()
        deadline = launched + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.launch.ready_url, timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - launched
                    return
            except httpx.HTTPError:
                pass
            time.sleep(self.poll_s)
        raise RuntimeError(f"server not ready after {self.ready_timeout_s:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def predict(self, body: bytes, content_type: str = "image/jpeg") -> dict:
        response = httpx.post(self.launch.predict_url, content=body, headers={"Content-Type": content_type},
                              timeout=120)
        response.raise_for_status()
        return response.json()

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's own process group, SIGKILL to whatever of the group is left after ``grace_s``."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the child's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):  # workers left in the group (TorchServe's backend) go too
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None
