"""How much an eager forward suffers from another Python thread that wants the GIL (an event loop under load).

    .venv/bin/python -m bench.gil_contention --model resnet18 --batch-size 4 --threads 1 --torchscript --compile

PyTorch releases the GIL inside each op and takes it back between ops, so an eager forward re-acquires the GIL
once per op; when another thread holds it, each re-acquisition can wait up to ``sys.getswitchinterval()``. The
script times the served bf16 form (``bench.limits.as_served``) alone and next to a pure-Python busy thread, for
each switch interval given. With ``--threads 1`` (the default) the busy thread has the other core to itself,
so what changes is GIL waiting, not CPU sharing. ``--torchscript`` adds a frozen trace (one C++ call per
forward; deprecated API, measured only), ``--compile`` torch.compile with inductor's freezing.
"""

from __future__ import annotations

import argparse
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from bench.bench_models import time_batches
from bench.limits import as_served
from bench.payload import BENCH_MODELS


@contextmanager
def gil_hog():
    """A thread spinning in pure Python for as long as the block runs."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def ms_per_forward(model: nn.Module, x: torch.Tensor, iters: int, autocast: Callable) -> float:
    time_batches(model, x, 1, autocast)  # warm-up (and, for torch.compile, the compile)
    return time_batches(model, x, iters, autocast) * 1000


def variants(args: argparse.Namespace, x: torch.Tensor) -> tuple[dict[str, nn.Module], Callable]:
    """Name -> module for each form, and the bf16 autocast factory they all run under."""
    eager, bf16 = as_served(BENCH_MODELS[args.model].build().eval(), "bfloat16")
    eager = eager.to(memory_format=torch.channels_last)
    out = {"eager": eager}
    if args.torchscript:
        with torch.inference_mode(), bf16(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            out["torchscript"] = torch.jit.freeze(torch.jit.trace(eager, x))
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        out["compiled"] = torch.compile(eager)
    return out, bf16


def measure(args: argparse.Namespace) -> list[dict]:
    x = BENCH_MODELS[args.model].random_batch(args.batch_size)
    rows = []
    models, bf16 = variants(args, x)
    for name, model in models.items():
        for interval in args.switch_intervals_ms:
            sys.setswitchinterval(interval / 1000)
            alone = ms_per_forward(model, x, args.iters, bf16)
            with gil_hog():
                contended = ms_per_forward(model, x, args.iters, bf16)
            rows.append({"form": name, "switch_interval_ms": interval, "alone_ms": alone, "with_hog_ms": contended})
            print(f"| {name} | {interval:g} | {alone:.0f} | {contended:.0f} | {contended / alone:.1f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=sorted(BENCH_MODELS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--switch-intervals-ms", type=lambda s: [float(v) for v in s.split(",")], default=[5.0, 0.5])
    p.add_argument("--torchscript", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(args.threads)
    try:
        return measure(args)
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)


if __name__ == "__main__":
    print("| form | switch interval ms | ms/forward alone | with a GIL-holding thread | slowdown |")
    print("|---|---:|---:|---:|---:|")
    main()
