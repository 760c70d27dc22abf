"""The served forward, eager against the compiled form (AOTInductor, service/compiled.py), interleaved round by round.

    .venv/bin/python -m bench.compiled_forward --model resnet18 --batch-sizes 1 8 --rounds 5
    .venv/bin/python -m bench.compiled_forward --model resnet18 --amp-dtype none      # float32 on any CPU

What is timed is exactly what the service runs: ``ModelRunner.run`` on uint8 pixels (normalisation, forward,
softmax, copy out), a few calls with the eager model and then as many with the compiled one, round after
round, so the machine's drift hits both alike. Reported: img/s of the fastest call and of the median call of
each form, and the median over rounds of (eager median call time ÷ compiled median call time). On a shared
machine the fastest call is the steadier figure: the others include time the process was not running.

The checkpoint is ``bench.payload``'s random-weight one. The compile (both the export and the C++ build) and the
package load are timed once; ``--cache DIR`` keeps the packages (and the checkpoint, whose version is part of the
key) for a later run, where only the load is timed. With ``--attention`` the attention-returning forward is
compiled and timed too. ``--busy-thread`` times both next to a pure-Python thread that wants the GIL all the
time (``bench/gil_contention.py`` explains why eager suffers from one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bench.payload import BENCH_MODELS, write_checkpoint
from service import compiled
from service.compiled import CompileCache, CompiledModel, compile_key
from service.inference import ModelRunner


def forward_seconds(runner: ModelRunner, model: CompiledModel | None, pixels: np.ndarray, attention: bool,
                    calls: int) -> list[float]:
    """Seconds of each of ``calls`` back-to-back ``runner.run`` calls with ``model`` (None: eager)."""
    runner.compiled = model
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        runner.run(pixels, attention=attention)
        times.append(time.perf_counter() - started)
    return times


def compare(runner: ModelRunner, model: CompiledModel, pixels: np.ndarray, attention: bool, rounds: int,
            calls: int) -> dict[str, float]:
    """Eager and compiled, ``calls`` forwards each per round, alternating; img/s from the fastest and the median
    call, and the median over rounds of (eager median time ÷ compiled median time)."""
    forward_seconds(runner, None, pixels, attention, 1)  # the first call of a batch size allocates
    forward_seconds(runner, model, pixels, attention, 1)
    eager: list[float] = []
    fast: list[float] = []
    ratios = []
    for _ in range(rounds):
        e = forward_seconds(runner, None, pixels, attention, calls)
        c = forward_seconds(runner, model, pixels, attention, calls)
        eager += e
        fast += c
        ratios.append(statistics.median(e) / statistics.median(c))
    n = len(pixels)
    return {"eager_best_img_s": n / min(eager), "compiled_best_img_s": n / min(fast),
            "eager_median_img_s": n / statistics.median(eager), "compiled_median_img_s": n / statistics.median(fast),
            "median_ratio": statistics.median(ratios)}


@contextlib.contextmanager
def busy_python_thread(enabled: bool) -> Iterator[None]:
    """A pure-Python loop in another thread (an event loop under load, say): it wants the GIL all the time."""
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=spin, daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if enabled:
            thread.join()


def build_forms(runner: ModelRunner, forms: list[str], cache: CompileCache, max_batch: int,
                threads: int) -> tuple[CompiledModel, dict[str, float]]:
    key = compile_key(runner, max_batch, threads)
    seconds: dict[str, float] = {}
    model = CompiledModel(runner.model, compiled.attention_names(runner))
    for form in forms:
        started = time.perf_counter()
        path = compiled.build(runner, form, key, cache)
        seconds[f"{form} compile_s"] = time.perf_counter() - started
        started = time.perf_counter()
        model = model.with_form(form, compiled.load_package(path, runner.device))
        seconds[f"{form} load_s"] = time.perf_counter() - started
    return model, seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.compiled_forward", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(BENCH_MODELS), default="resnet18")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="forwards per form per round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "none"])
    p.add_argument("--attention", action="store_true", help="also compile and time the attention forward")
    p.add_argument("--busy-thread", action="store_true", help="time next to a pure-Python thread that wants the "
                   "GIL all the time: eager re-takes the GIL between ops, the compiled form runs in C++")
    p.add_argument("--cache", type=Path, help="compile cache to reuse (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.cache or Path(tempfile.mkdtemp(prefix="macula-compiled-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{args.model}.safetensors"  # kept with a --cache, so that its version (the key) stays the same
    if not path.exists():
        write_checkpoint(BENCH_MODELS[args.model], path)
    runner = ModelRunner(args.model, path, device="cpu", amp_dtype=args.amp_dtype)
    forms = ["forward", "attention"] if args.attention else ["forward"]
    model, seconds = build_forms(runner, forms, CompileCache(work), max(args.batch_sizes), args.threads)
    print(f"{args.model}, {runner.precision}, {args.threads} threads: " +
          ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)
    rows = []
    for batch in args.batch_sizes:
        pixels = compiled.example_pixels(runner, batch)
        for attention in [False, True] if args.attention else [False]:
            with busy_python_thread(args.busy_thread):
                row = {"batch": batch, "attention": attention, "busy_thread": args.busy_thread,
                       **compare(runner, model, pixels, attention, args.rounds, args.calls)}
            rows.append(row)
            print(f"batch {batch:3d}{' +attention' if attention else '           '}: img/s best (median call) "
                  f"eager {row['eager_best_img_s']:.1f} ({row['eager_median_img_s']:.1f}), compiled "
                  f"{row['compiled_best_img_s']:.1f} ({row['compiled_median_img_s']:.1f}); compiled/eager "
                  f"{row['median_ratio']:.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "precision": runner.precision, "threads": args.threads,
                                         "torch": torch.__version__, **seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
