"""Why a forward run from a server's thread is slower than in a script: OpenMP thread teams and helper wake-ups.

    .venv/bin/python -m bench.omp_teams --model resnet18 --rounds 3
    .venv/bin/python -m bench.omp_teams --spin-counts 0,10000,300000      # + GOMP_SPINCOUNT variants
    .venv/bin/python -m bench.omp_teams --gaps                            # the gaps between a forward's ops

libgomp (torch's OpenMP runtime on Linux) gives every thread that runs a parallel op a team of its own, and once
the process holds more OpenMP threads than there are cores it stops spinning between parallel regions: each op
then ends with its helper threads asleep and starts with a futex wake-up. Each configuration runs in a fresh
process (libgomp's state is per process), times ``--iters`` batch-1 forwards of the served form (bf16 where the
CPU has it, BatchNorm folded, channels_last) and counts the process's voluntary context switches per forward
(a thread that went to sleep), which does not depend on how busy the machine is:

``script``: build and run in the main thread (one team: what a benchmark script measures).
``second team``: the same, after another thread ran one parallel op and stays alive (a loader thread).
``thread``: built in the main thread, run in a second thread (two teams: a server's inference thread).
``worker``: one non-main thread does everything, the main thread never runs torch (one team).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

CONFIGS = ("script", "second team", "thread", "worker")


def measure(config: str, model_key: str, iters: int) -> dict:
    """Run in the child: one configuration, its forwards' wall and CPU time and voluntary switches."""
    import torch

    from bench.limits import as_served
    from bench.payload import BENCH_MODELS
    from service.inference import cpu_has_native_bf16

    spec = BENCH_MODELS[model_key]

    def build():
        net, autocast = as_served(spec.build().eval(), "bfloat16" if cpu_has_native_bf16() else "float32")
        return net.to(memory_format=torch.channels_last), autocast, spec.random_batch(1)

    def timed(net, autocast, x) -> dict:
        with torch.inference_mode(), autocast():
            net(x)
            before, cpu, times = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), []
            for _ in range(iters):
                start = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        return {"ms": 1000 * statistics.median(times), "cpu_ms": 1000 * (time.process_time() - cpu) / iters,
                "sleeps_per_forward": (after.ru_nvcsw - before.ru_nvcsw) / iters}

    def in_thread(fn) -> dict:
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(fn()))
        thread.start()
        thread.join()
        return out

    if config == "script":
        return timed(*build())
    if config == "second team":
        parts, done = build(), threading.Event()
        threading.Thread(target=lambda: (torch.randn(1 << 22).add_(1), done.set(), time.sleep(3600)),
                         daemon=True).start()
        done.wait()
        return timed(*parts)
    if config == "thread":
        parts = build()
        return in_thread(lambda: timed(*parts))
    return in_thread(lambda: timed(*build()))


def op_gaps(model_key: str, forwards: int = 5) -> dict:
    """Microseconds between consecutive top-level ops of a batch-1 forward (torch.profiler): how long a helper
    thread must keep spinning to be awake for the next op."""
    import numpy as np
    import torch

    from bench.limits import as_served
    from bench.payload import BENCH_MODELS
    from service.inference import cpu_has_native_bf16

    spec = BENCH_MODELS[model_key]
    net, autocast = as_served(spec.build().eval(), "bfloat16" if cpu_has_native_bf16() else "float32")
    net, x = net.to(memory_format=torch.channels_last), spec.random_batch(1)
    with torch.inference_mode(), autocast():
        for _ in range(3):
            net(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                net(x)
    ops = sorted((e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")),
                 key=lambda e: e.time_range.start)
    gaps = np.array([b.time_range.start - a.time_range.end for a, b in zip(ops, ops[1:], strict=False)])
    gaps = gaps[gaps < 20_000]  # not the pause between two forwards
    p50, p90, p99 = np.percentile(gaps, [50, 90, 99])
    return {"ops_per_forward": len(ops) // forwards, "gap_us_p50": p50, "gap_us_p90": p90, "gap_us_p99": p99}


def run_child(config: str, args: argparse.Namespace, spin: str | None) -> dict:
    env = dict(os.environ)
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    out = subprocess.run([sys.executable, "-m", "bench.omp_teams", "--child", config, "--model", args.model,
                          "--iters", str(args.iters)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--spin-counts", type=lambda s: s.split(","), default=[], help="GOMP_SPINCOUNT values to add")
    p.add_argument("--gaps", action="store_true", help="only profile the gaps between a forward's ops")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gaps:
        gaps = op_gaps(args.model)
        print(f"{args.model}: {gaps['ops_per_forward']} top-level ops per forward; gaps between them "
              f"p50 {gaps['gap_us_p50']:.0f} µs, p90 {gaps['gap_us_p90']:.0f} µs, p99 {gaps['gap_us_p99']:.0f} µs")
        return [gaps]
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.iters)))
        return []
    variants = [(c, None) for c in CONFIGS] + [("script", s) for s in args.spin_counts]
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved: each round runs every variant once
        for variant in variants:
            runs[variant].append(run_child(variant[0], args, variant[1]))
    print(f"{args.model}, batch 1, {args.rounds} rounds of {args.iters} forwards (medians over rounds)\n")
    print("| configuration | GOMP_SPINCOUNT | ms/forward | CPU ms/forward | sleeps/forward |\n|---|---|---:|---:|---:|")
    rows = []
    for (config, spin), results in runs.items():
        row = {"config": config, "spin": spin or "default",
               **{k: statistics.median(r[k] for r in results) for k in results[0]}}
        rows.append(row)
        print(f"| {config} | {row['spin']} | {row['ms']:.1f} | {row['cpu_ms']:.1f} | {row['sleeps_per_forward']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
