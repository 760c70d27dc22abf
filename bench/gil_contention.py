"""How much an eager forward suffers from another Python thread that wants the GIL (an event loop under load).

    .venv/bin/python -m bench.gil_contention --model resnet18 --batch-size 4 --threads 1 --torchscript --compile

PyTorch releases the GIL inside each op and takes it back between ops, so an eager forward re-acquires the GIL
once per op; when another thread holds it, each re-acquisition can wait up to ``sys.getswitchinterval()``. The
script times the served bf16 form (``prepare_for_serving``) alone and next to a pure-Python busy thread, for
each switch interval given. With ``--threads 1`` (the default) the busy thread has the other core to itself,
so what changes is GIL waiting, not CPU sharing. ``--torchscript`` adds a frozen trace (one C++ call per
forward; deprecated API, measured only), ``--compile`` torch.compile with inductor's freezing.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from bench.payload import BENCH_MODELS
from models import create_model
from service.inference import prepare_for_serving


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


def ms_per_forward(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
    return (time.perf_counter() - start) / iters * 1000


def variants(args: argparse.Namespace, x: torch.Tensor) -> dict[str, nn.Module]:
    spec = BENCH_MODELS[args.model]
    torch.manual_seed(0)
    eager = prepare_for_serving(create_model(spec.arch, attention=spec.attention, num_classes=spec.num_classes),
                                torch.device("cpu"), torch.bfloat16, memory_format=torch.channels_last)
    out = {"eager": eager}
    if args.torchscript:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            out["torchscript"] = torch.jit.freeze(torch.jit.trace(eager, x))
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        out["compiled"] = torch.compile(eager)
    return out


def measure(args: argparse.Namespace) -> list[dict]:
    pre = BENCH_MODELS[args.model].preprocessing
    channels = 3 if pre.color == "RGB" else 1
    x = torch.randn(args.batch_size, channels, *pre.input_size).to(memory_format=torch.channels_last)
    rows = []
    for name, model in variants(args, x).items():
        for interval in args.switch_intervals_ms:
            sys.setswitchinterval(interval / 1000)
            alone = ms_per_forward(model, x, args.iters)
            with gil_hog():
                contended = ms_per_forward(model, x, args.iters)
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
