"""Inference throughput (img/s) per model × batch size × memory format, under torch.inference_mode.

    nice -n 5 .venv/bin/python bench/bench_models.py --models resnet50 resnet50+cbam resnet50+bam timm:resnet50+cbam \
        --batch-sizes 8 --formats channels_last --iters 10 --warmup 3 --repeats 5 --json runs/bench_models.json

A model spec is ``NAME[+ATTENTION]`` (``resnet18+cbam``) for ours, ``timm:resnet50+cbam`` for timm's CBAM
ResNet (random weights, ``block_args=dict(attn_layer="cbam")``). On CUDA the forward runs under bf16 autocast.
Other processes share the CPU, so the measurements of one (batch, format) are interleaved across models and
repeated; each row reports the best (least disturbed) repeat and the median. Ratios are against the plain
model of the same architecture, at the same batch size and memory format: best ÷ best, and the median over
rounds of the per-round ratio (the two ran back to back, so this one drifts least).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def build(spec: str, num_classes: int) -> nn.Module:
    """``resnet50``, ``resnet50+cbam``, ``resnet50+bam``, ``timm:resnet50+cbam``."""
    torch.manual_seed(0)
    timm_model = spec.startswith("timm:")
    name, _, attention = spec.removeprefix("timm:").partition("+")
    if timm_model:
        import timm

        block_args = {"attn_layer": attention} if attention else None
        return timm.create_model(name, pretrained=False, num_classes=num_classes, block_args=block_args)
    return create_model(name, attention=attention or None, num_classes=num_classes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(model: nn.Module, x: torch.Tensor, iters: int, autocast) -> float:
    """Seconds per batch, averaged over ``iters`` forwards."""
    with torch.inference_mode(), autocast():
        sync(x.device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync(x.device)
    return (time.perf_counter() - start) / max(iters, 1)


def measure(specs: list[str], batch: int, fmt: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Interleave the models: warm each up, then ``repeats`` rounds of ``iters`` forwards per model."""
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    models, inputs = {}, {}
    for spec in specs:
        models[spec] = build(spec, args.num_classes).eval().to(device, memory_format=FORMATS[fmt])
        inputs[spec] = torch.randn(batch, 3, args.size, args.size, device=device) \
            .contiguous(memory_format=FORMATS[fmt])
        time_batches(models[spec], inputs[spec], args.warmup, autocast)
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    for _ in range(args.repeats):
        for spec in specs:
            times[spec].append(time_batches(models[spec], inputs[spec], args.iters, autocast))
    rows = []
    for spec in specs:
        best, median = min(times[spec]), statistics.median(times[spec])
        rows.append({"model": spec, "batch": batch, "format": fmt, "device": device.type, "size": args.size,
                     "dtype": "bf16-autocast" if device.type == "cuda" else "fp32", "threads": torch.get_num_threads(),
                     "ms_per_batch": round(best * 1e3, 3), "ms_per_batch_median": round(median * 1e3, 3),
                     "img_s": round(batch / best, 2), "img_s_median": round(batch / median, 2),
                     "ms_per_batch_rounds": [round(t * 1e3, 3) for t in times[spec]]})
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``time_ratio``: best time ÷ the plain model's best (same architecture, batch, format);
    ``time_ratio_median``: the median over rounds of the two models' times in that round."""
    plain = {r["model"]: r for r in rows if "+" not in r["model"]}
    for r in rows:
        base = plain.get(r["model"].removeprefix("timm:").partition("+")[0])
        if base is not None:
            r["time_ratio"] = round(r["ms_per_batch"] / base["ms_per_batch"], 3)
            # per round, model and plain ran back to back: the median of those ratios drifts least
            per_round = [t / b for t, b in zip(r["ms_per_batch_rounds"], base["ms_per_batch_rounds"], strict=True)]
            r["time_ratio_median"] = round(statistics.median(per_round), 3)


def profile(specs: list[str], batch: int, fmt: str, args: argparse.Namespace, device: torch.device) -> None:
    """torch.profiler: the top operators by self time, per model, for one (batch, format)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    for spec in specs:
        model = build(spec, args.num_classes).eval().to(device, memory_format=FORMATS[fmt])
        x = torch.randn(batch, 3, args.size, args.size, device=device).contiguous(memory_format=FORMATS[fmt])
        time_batches(model, x, max(args.warmup, 1), nullcontext)
        with torch_profile(activities=activities) as prof:
            time_batches(model, x, args.iters, nullcontext)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n== {spec}, batch {batch}, {fmt}, {device.type}: {args.iters} forwards, "
              f"self CPU {total / 1e3 / args.iters:.1f} ms per forward")
        for e in events[:args.profile_rows]:
            print(f"{e.key:<36} {e.self_cpu_time_total / 1e3 / args.iters:9.2f} ms/fwd "
                  f"{100 * e.self_cpu_time_total / total:6.2f}% {e.count // args.iters:6d} calls/fwd")


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<22} {'batch':>5} {'format':<13} {'dev':<4} {'img/s':>9} {'median':>9} {'ms/batch':>9} "
          f"{'÷plain':>7} {'median÷':>7}")
    for r in rows:
        ratio = f"{r['time_ratio']:.3f} {r['time_ratio_median']:7.3f}" if "time_ratio" in r else ""
        print(f"{r['model']:<22} {r['batch']:>5} {r['format']:<13} {r['device']:<4} {r['img_s']:>9.1f} "
              f"{r['img_s_median']:>9.1f} {r['ms_per_batch']:>9.2f} {ratio:>15}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "resnet50+cbam", "resnet50+bam", "timm:resnet50+cbam"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    p.add_argument("--size", type=int, default=224, help="input height = width")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=10, help="forwards per timed repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, interleaved across models")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available, and cpu too)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables instead of timing")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--json", default=None, help="write the rows as JSON to this path ('-' for stdout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device != "auto" else ["cpu"] + ["cuda"] * torch.cuda.is_available()
    rows = []
    for device in devices:
        for fmt in args.formats:
            for batch in args.batch_sizes:
                if args.profile:
                    profile(args.models, batch, fmt, args, torch.device(device))
                    continue
                rows += measure(args.models, batch, fmt, args, torch.device(device))
    if args.profile:
        return rows
    if args.json != "-":
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
              f"{args.iters} iters x {args.repeats} repeats (best; median)")
        print_table(rows)
    if args.json:
        text = json.dumps({"torch": torch.__version__, "args": vars(args), "rows": rows}, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
    return rows


if __name__ == "__main__":
    main()
