"""Serving benchmark: Macula against the physical limit, a naive FastAPI server, LitServe and TorchServe.

One command, one run, one machine: for each model it writes the benchmark JPEG and a random-weight Macula
checkpoint, measures the physical limit (raw model img/s + plain decode), then starts each server in turn on
loopback, checks its top-1 against the model run directly, warms it up and loads it with wrk at each
concurrency. Results: ``OUT/serving.json`` and ``OUT/serving.md``.

    python -m bench.run_serving                                   # full: resnet18,resnet50 x 4 servers x 1,8,32
    python -m bench.run_serving --models resnet20 --servers naive,macula --concurrency 1 --duration 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from bench import limits
from bench.load import run_wrk
from bench.payload import BENCH_MODELS, write_checkpoint, write_jpeg
from bench.report import add_ratios, markdown
from bench.servers.common import PRECISION_ENV, Classifier
from bench.servers.launch import SERVERS, BatchConfig, RunningServer, top1
from bench.servers.procstat import group_cpu_seconds
from bench.servers.scrape import macula_precision, macula_stats, means_between

REPO = Path(__file__).resolve().parents[1]


def default_batch() -> BatchConfig:
    """The peers get Macula's own CPU batch defaults, so that every batching server plays by the same rules."""
    try:
        from service.settings import CPU_BATCH_DEFAULTS
    except ImportError:
        CPU_BATCH_DEFAULTS = (8, 3.0)  # noqa: N806 (mirrors the service constant)
    return BatchConfig(*CPU_BATCH_DEFAULTS)


def default_precisions() -> list[str]:
    """float32, plus bfloat16 where Macula would serve in it (a CPU with native bf16)."""
    try:
        from service.inference import cpu_has_native_bf16
    except ImportError:
        return ["float32"]
    return ["float32", "bfloat16"] if cpu_has_native_bf16() else ["float32"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--models", type=csv, default=["resnet18", "resnet50"], help=f"of {', '.join(BENCH_MODELS)}")
    p.add_argument("--servers", type=csv, default=["naive", "litserve", "torchserve", "macula"])
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in csv(s)], default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load per concurrency")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds of load before measuring (0: none)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "serving")
    p.add_argument("--max-batch-size", type=int, default=None, help="peers' batch size (default: Macula's CPU one)")
    p.add_argument("--max-batch-delay-ms", type=float, default=None)
    p.add_argument("--raw-batch-sizes", type=lambda s: [int(x) for x in csv(s)], default=[1, 2, 4, 8, 16])
    p.add_argument("--raw-time", type=float, default=1.0, help="seconds per raw (threads, format, batch) point")
    p.add_argument("--raw-threads", type=lambda s: [int(x) for x in csv(s)],
                   default=sorted({1, torch.get_num_threads()}), help="torch thread counts for the raw limit")
    p.add_argument("--raw-precisions", type=csv, default=default_precisions(),
                   help="limits to measure besides float32 (default: bfloat16 where the CPU has native bf16)")
    p.add_argument("--peer-precision", choices=["float32", "bfloat16"], default="float32",
                   help="run the peers' model in this precision too (bfloat16: BN folded + CPU bf16 autocast)")
    p.add_argument("--port", type=int, default=8100, help="first port; each server gets port + 10 * i")
    p.add_argument("--macula-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra MACULA_* setting for the Macula server (repeatable; for tuning runs)")
    return p.parse_args(argv)


def model_limits(key: str, ckpt: Path, jpeg: bytes, args: argparse.Namespace) -> dict:
    """Reference top-1 (the model run directly on the checkpoint's own transform) and the physical limit."""
    classifier = Classifier(ckpt)
    probs = classifier.probabilities(classifier.preprocess(jpeg).unsqueeze(0))[0]
    top2 = probs.topk(2)
    result = {"reference_top1": int(top2.indices[0]), "reference_margin": float(top2.values[0] - top2.values[1])}
    result |= limits.measure(classifier.model, classifier.meta.preprocessing, jpeg,
                             batch_sizes=args.raw_batch_sizes, min_time_s=args.raw_time,
                             thread_counts=args.raw_threads,
                             precisions=tuple(dict.fromkeys(["float32", *args.raw_precisions])))
    for precision, limit in result["limits"].items():
        top = limit["best_raw"]
        print(f"[{key}] {precision} raw best {top['img_per_s']:.1f} img/s (batch {top['batch_size']}, "
              f"{top['memory_format']}, {top['threads']} threads), decode {result['decode_ms']:.2f} ms "
              f"-> limit {limit['physical_limit_img_per_s']:.1f} img/s", flush=True)
    del classifier
    gc.collect()
    return result


def measure_server(server: str, key: str, ckpt: Path, jpeg_path: Path, port: int, args: argparse.Namespace,
                   batch: BatchConfig) -> list[dict]:
    """Start ``server``, check its answer, warm it up, run wrk at each concurrency; one row per concurrency."""
    work = (args.out / "work" / f"{server}-{key}").resolve()
    launch = SERVERS[server](ckpt.resolve(), key, port, work, batch)
    if server == "macula":
        launch.env |= dict(kv.split("=", 1) for kv in args.macula_env)
    else:
        launch.env[PRECISION_ENV] = args.peer_precision
    rows = []
    with RunningServer(launch, work / "server.log") as running:
        answer = running.predict(jpeg_path.read_bytes())
        served_top1 = top1(server, answer)
        precision = macula_precision(launch, key) if server == "macula" else args.peer_precision
        if args.warmup > 0:
            run_wrk(launch.predict_url, jpeg_path, concurrency=max(args.concurrency), duration_s=args.warmup)
        for concurrency in args.concurrency:
            stats_before = macula_stats(launch, key) if server == "macula" else None
            cpu_before, load_before = group_cpu_seconds(running.proc.pid), os.getloadavg()[0]
            result = run_wrk(launch.predict_url, jpeg_path, concurrency=concurrency, duration_s=args.duration)
            server_cpu = group_cpu_seconds(running.proc.pid) - cpu_before
            row = {"server": server, "model": key, "precision": precision, "top1": served_top1, **result.to_dict(),
                   "server_cpu_share": server_cpu / result.duration_s, "loadavg_1m_before": load_before,
                   "loadavg_1m_after": os.getloadavg()[0]}
            if stats_before is not None:
                row |= means_between(stats_before, macula_stats(launch, key))
            print(f"[{key}] {server:10s} c={concurrency:<3d} {row['req_per_s']:7.1f} req/s  p50 {row['p50_ms']:8.1f}"
                  f"  p99 {row['p99_ms']:8.1f} ms  errors {row['error_count']}  wrk cpu {row['wrk_cpu_share']:.2f}"
                  f"  server cpu {row['server_cpu_share']:.2f}", flush=True)
            rows.append(row)
    return rows


def environment() -> dict:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"uptime": uptime, "loadavg": os.getloadavg(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.platform(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run(args: argparse.Namespace) -> dict:
    base = default_batch()
    batch = BatchConfig(args.max_batch_size or base.max_batch_size,
                        base.max_batch_delay_ms if args.max_batch_delay_ms is None else args.max_batch_delay_ms)
    args.out = args.out.resolve()  # servers run with their own working directories
    args.out.mkdir(parents=True, exist_ok=True)
    jpeg_path = write_jpeg(args.out / "work" / "chelsea.jpg")
    report = {"environment_before": environment(), "args": {k: str(v) for k, v in vars(args).items()},
              "batch": {"max_batch_size": batch.max_batch_size, "max_batch_delay_ms": batch.max_batch_delay_ms},
              "jpeg": {"path": str(jpeg_path), "bytes": jpeg_path.stat().st_size}, "models": {}, "rows": [],
              "failures": []}
    for key in args.models:
        ckpt = write_checkpoint(BENCH_MODELS[key], args.out / "work" / f"{key}.safetensors")
        report["models"][key] = model_limits(key, ckpt, jpeg_path.read_bytes(), args)
        for i, server in enumerate(args.servers):
            if server == "macula" and not (REPO / "service" / "__main__.py").exists():
                report["failures"].append({"server": server, "model": key, "error": "service/__main__.py missing"})
                continue
            try:
                report["rows"] += measure_server(server, key, ckpt, jpeg_path, args.port + 10 * i, args, batch)
            except Exception as exc:  # noqa: BLE001 (one server failing must not lose the others' numbers)
                print(f"[{key}] {server} FAILED: {exc}", flush=True)
                report["failures"].append({"server": server, "model": key, "error": str(exc)[-3000:]})
    report["environment_after"] = environment()
    add_ratios(report)
    (args.out / "serving.json").write_text(json.dumps(report, indent=1))
    (args.out / "serving.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> dict:
    report = run(parse_args(argv))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
