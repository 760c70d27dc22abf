"""Build a TorchServe model store and config for one Macula checkpoint, and the command that serves it.

Everything binds to loopback, token auth is off (``--disable-token-auth``), the model-control API stays off,
one worker, and the batch settings match the other servers' (``batchSize``, ``maxBatchDelay`` in ms).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HANDLER = Path(__file__).with_name("torchserve_handler.py")


def build_model_store(checkpoint: Path, workdir: Path, *, name: str, batch_size: int, batch_delay_ms: float) -> Path:
    """``workdir/store/<name>/``: an unpacked archive (handler + checkpoint + model config)."""
    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    model_config = workdir / "model-config.yaml"
    model_config.write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch_size}\n"
                            f"maxBatchDelay: {max(1, round(batch_delay_ms))}\nresponseTimeout: 120\n")
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run([str(archiver if archiver.exists() else shutil.which("torch-model-archiver")),
                    "--model-name", name, "--version", "1.0", "--handler", str(HANDLER),
                    "--extra-files", str(checkpoint), "--config-file", str(model_config),
                    "--export-path", str(store), "--archive-format", "no-archive", "--force"],
                   check=True, capture_output=True, text=True)
    return store


def write_config(workdir: Path, store: Path, port: int) -> Path:
    """``config.properties``: inference on ``port``, management and metrics on the next two, all loopback."""
    config = workdir / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{port}",
        f"management_address=http://127.0.0.1:{port + 1}",
        f"metrics_address=http://127.0.0.1:{port + 2}",
        f"model_store={store}",
        "default_workers_per_model=1",
        "job_queue_size=1000",
        "default_response_timeout=120",
        "disable_system_metrics=true",
        "install_py_dep_per_model=false",
        "enable_envvars_config=false",
        "",
    ]))
    return config


def serve_command(config: Path, store: Path, name: str) -> list[str]:
    torchserve = Path(sys.executable).with_name("torchserve")
    return [str(torchserve if torchserve.exists() else shutil.which("torchserve")), "--start", "--foreground",
            "--ncs", "--disable-token-auth", "--ts-config", str(config), "--model-store", str(store),
            "--models", f"{name}={name}"]
