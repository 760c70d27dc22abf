"""Tuning sweep: the same load against Macula under different ``MACULA_*`` settings, one after another.

Each ``--config`` is a space-separated list of ``KEY=VALUE`` (``default`` = out-of-the-box). Configurations are
run in ``--rounds`` interleaved rounds so that a change in the machine's background load hits all of them alike.

    python -m bench.tune_macula --model resnet18 --concurrency 1,32 --duration 8 \
        --config default --config "MACULA_TORCH_THREADS=1" --config "MACULA_MAX_BATCH_SIZE=4"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.payload import BENCH_MODELS, write_checkpoint, write_jpeg
from bench.run_serving import REPO, default_batch, environment, measure_server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=sorted(BENCH_MODELS))
    p.add_argument("--config", action="append", default=[], help="'default' or 'KEY=VALUE KEY=VALUE'")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "tune")
    return p.parse_args(argv)


def summarise(rows: list[dict]) -> list[dict]:
    """Median over rounds of req/s, p50, p99 and mean batch size, per (config, concurrency)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["concurrency"]), []).append(row)
    out = []
    for (config, concurrency), group in groups.items():
        batches = [r["mean_batch_size"] for r in group if r.get("mean_batch_size")]
        out.append({"config": config, "concurrency": concurrency, "rounds": len(group),
                    "req_per_s": statistics.median(r["req_per_s"] for r in group),
                    "p50_ms": statistics.median(r["p50_ms"] for r in group),
                    "p99_ms": statistics.median(r["p99_ms"] for r in group),
                    "mean_batch_size": statistics.median(batches) if batches else None,
                    "server_cpu_share": statistics.median(r["server_cpu_share"] for r in group),
                    "req_per_cpu_s": statistics.median(r["req_per_s"] / r["server_cpu_share"] for r in group
                                                       if r["server_cpu_share"]),
                    "errors": sum(r["error_count"] for r in group)})
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| config | conc | req/s | p50 ms | p99 ms | batch | server CPU | req/CPU-s | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["concurrency"], -s["req_per_s"])):
        batch = "" if s["mean_batch_size"] is None else f"{s['mean_batch_size']:.1f}"
        lines.append(f"| {s['config']} | {s['concurrency']} | {s['req_per_s']:.1f} | {s['p50_ms']:.1f} | "
                     f"{s['p99_ms']:.1f} | {batch} | {s['server_cpu_share']:.0%} | {s['req_per_cpu_s']:.1f} | "
                     f"{s['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    configs = args.config or ["default"]
    args.out = args.out.resolve()  # servers run with their own working directories
    args.out.mkdir(parents=True, exist_ok=True)
    jpeg = write_jpeg(args.out / "work" / "chelsea.jpg")
    ckpt = write_checkpoint(BENCH_MODELS[args.model], args.out / "work" / f"{args.model}.safetensors")
    before, rows = environment(), []
    for _ in range(args.rounds):
        for i, config in enumerate(configs):
            env = [] if config == "default" else config.split()
            run_args = argparse.Namespace(out=args.out, concurrency=args.concurrency, warmup=args.warmup,
                                          duration=args.duration, macula_env=env)
            for row in measure_server("macula", args.model, ckpt, jpeg, args.port + 10 * i, run_args,
                                      default_batch()):
                rows.append({**row, "config": config})
    summary = summarise(rows)
    report = {"environment_before": before, "environment_after": environment(), "model": args.model,
              "rows": rows, "summary": summary}
    (args.out / "tune.json").write_text(json.dumps(report, indent=1))
    (args.out / "tune.md").write_text(markdown(summary))
    print(f"load before: {before['uptime']}\nload after: {report['environment_after']['uptime']}\n{markdown(summary)}")
    return summary


if __name__ == "__main__":
    main()
