"""Forward img/s of one model in each form a server can run it, interleaved round by round on this CPU.

    .venv/bin/python -m bench.serving_forms --model resnet18 --batch-size 8 --rounds 5
    .venv/bin/python -m bench.serving_forms --model resnet50 --batch-size 8 --rounds 3 --compile   # + inductor

Forms (all channels_last, ``torch.inference_mode``, random input of the benchmark model's size):
``float32`` as loaded; ``float32 folded`` (BatchNorm folded, Macula's float32 form); ``bf16 autocast`` (folded,
float32 weights that autocast casts on every forward); ``bf16 served`` (folded, weights cast to bf16 once at
load, under autocast: Macula's form on a CPU with native bf16); with ``--compile`` also ``bf16 compiled``
(the served form through ``torch.compile`` with inductor's weight freezing, compile time reported). The
machine's speed drifts between minutes, so each round times every form back to back and the ratio reported is
the median over rounds of (form ÷ float32 in the same round).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from bench.limits import as_served, time_forward
from bench.payload import BENCH_MODELS
from models import fold_batchnorm


def compiled(model: nn.Module, x: torch.Tensor, autocast: Callable) -> tuple[nn.Module, float]:
    """``model`` through torch.compile with inductor's freezing (weights become constants), and the seconds the
    first call (the compile) took."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    fast = torch.compile(model)
    start = time.perf_counter()
    with torch.inference_mode(), autocast():
        fast(x)
    return fast, time.perf_counter() - start


def forms(model: nn.Module, x: torch.Tensor, with_compile: bool) -> dict[str, tuple[nn.Module, Callable]]:
    """Name -> (module, autocast factory) for every form measured."""
    cl = torch.channels_last
    served, bf16 = as_served(model, "bfloat16")
    out = {"float32": (copy.deepcopy(model).to(memory_format=cl), nullcontext),
           "float32 folded": (fold_batchnorm(copy.deepcopy(model)).to(memory_format=cl), nullcontext),
           "bf16 autocast": (fold_batchnorm(copy.deepcopy(model)).to(memory_format=cl), bf16),
           "bf16 served": (served.to(memory_format=cl), bf16)}
    if with_compile:
        fast, seconds = compiled(out["bf16 served"][0], x, bf16)
        print(f"bf16 compiled: first call (compile) {seconds:.1f} s", flush=True)
        out["bf16 compiled"] = (fast, bf16)
    return out


def measure(args: argparse.Namespace) -> dict:
    spec = BENCH_MODELS[args.model]
    model = spec.build().eval()
    x = spec.random_batch(args.batch_size)
    candidates = forms(model, x, args.compile)
    rounds: list[dict[str, float]] = []
    for i in range(args.rounds):
        rounds.append({name: args.batch_size / time_forward(net, x, min_time_s=args.time, autocast=autocast)
                       for name, (net, autocast) in candidates.items()})
        print(f"round {i}: " + "  ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()), flush=True)
    summary = {name: {"best_img_per_s": max(r[name] for r in rounds),
                      "median_x_float32": statistics.median(r[name] / r["float32"] for r in rounds)}
               for name in candidates}
    return {"model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "rounds": rounds, "summary": summary}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=sorted(BENCH_MODELS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--time", type=float, default=1.0, help="seconds per form per round")
    p.add_argument("--compile", action="store_true", help="also time the bf16 form through torch.compile")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = measure(args)
    print("\n| form | best img/s | median × float32 |\n|---|---:|---:|")
    for name, s in result["summary"].items():
        print(f"| {name} | {s['best_img_per_s']:.1f} | {s['median_x_float32']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
