"""How long a restart takes to be ready: Macula started on a warm compile cache, until ``/readyz`` answers 200.

    python -m bench.ready_time --models resnet18,resnet50 --starts 3

Per model: the compile cache is built once (``python -m service.compile``, as a deploy would), then the service
is started ``--starts`` times on it; each start is timed from the process launch to the first 200 of ``/readyz``,
and ``serving_form`` of ``/v1/models/{name}`` says whether the compiled forward serves. One start with
``MACULA_COMPILE=off`` is timed too, for the eager baseline. The table goes to stdout (markdown) and to
``OUT/ready_time.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.payload import BENCH_MODELS, write_checkpoint
from bench.servers.launch import REPO, Launch, RunningServer


def start_once(model_dir: Path, name: str, port: int, env: dict[str, str], log: Path) -> dict:
    """Launch, poll /readyz every 50 ms, read the serving form, stop; seconds from launch to ready."""
    base = f"http://127.0.0.1:{port}"
    launch = Launch([sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)],
                    f"{base}/readyz", f"{base}/v1/models/{name}/predict", env=env)
    with RunningServer(launch, log, poll_s=0.05) as server:
        form = httpx.get(f"{base}/v1/models/{name}", timeout=5).json().get("serving_form", "eager")
        return {"ready_s": server.ready_s, "serving_form": form}


def measure(key: str, args: argparse.Namespace) -> list[dict]:
    model_dir = args.out / key
    model_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(BENCH_MODELS[key], model_dir / f"{key}.safetensors")
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "service.compile", "--model-dir", str(model_dir)], check=True, cwd=REPO,
                   capture_output=True)
    build_s = time.monotonic() - began
    rows = []
    for label, env, starts in (("eager (MACULA_COMPILE=off)", {"MACULA_COMPILE": "off"}, 1),
                               ("warm compile cache", {}, args.starts)):
        runs = [start_once(model_dir, key, args.port, env, args.out / f"{key}-{label[:5]}-{i}.log")
                for i in range(starts)]
        rows.append({"model": key, "start": label, "starts": starts,
                     "ready_s_median": statistics.median(r["ready_s"] for r in runs),
                     "ready_s_max": max(r["ready_s"] for r in runs),
                     "serving_form": "/".join(sorted({r["serving_form"] for r in runs})), "cache_build_s": build_s})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ready_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["resnet18", "resnet50"])
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ready_time")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for key in args.models for row in measure(key, args)]
    (args.out / "ready_time.json").write_text(json.dumps(rows, indent=1))
    print("| model | start | starts | ready s (median) | ready s (max) | serving form | cache build s |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['start']} | {r['starts']} | {r['ready_s_median']:.1f} | {r['ready_s_max']:.1f} | "
              f"{r['serving_form']} | {r['cache_build_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
