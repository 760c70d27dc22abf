"""The physical limit a server can reach on this machine: raw model throughput plus a plain per-image decode.

``physical limit = 1 / (1 / best_raw_img_per_s + decode_s)``: the model at its best batch size and memory
format (``torch.inference_mode``, all cores), plus a plain PIL decode -> resize 256 -> crop 224 -> normalise of
the benchmark JPEG, both measured in the same run as the servers.

One limit per precision: ``float32`` is the checkpoint's model as loaded (the limit the issue defines, and
what the peers run); ``bfloat16`` is the model as Macula serves it on a CPU with native bf16 (BatchNorm
folded, bf16 weights, bf16 autocast), so that Macula is also held to the limit of the very computation it runs.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.bench_models import time_batches
from models import Preprocessing
from service.inference import prepare_for_serving

PRECISIONS = ("float32", "bfloat16")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass
class RawPoint:
    batch_size: int
    memory_format: str
    img_per_s: float
    ms_per_batch: float
    threads: int = 0  # torch intra-op threads it ran with
    precision: str = "float32"


def as_served(model: nn.Module, precision: str) -> tuple[nn.Module, object]:
    """(model, autocast factory) for ``precision``: float32 is ``model`` itself; bfloat16 is a copy prepared as
    Macula's CPU runner serves it (BatchNorm folded, bf16 weights) under CPU bf16 autocast."""
    if precision == "float32":
        return model, nullcontext
    if precision != "bfloat16":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    served = prepare_for_serving(copy.deepcopy(model), torch.device("cpu"), torch.bfloat16)
    return served, lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def time_forward(model: nn.Module, batch: torch.Tensor, *, min_time_s: float, rounds: int = 3,
                 autocast=nullcontext) -> float:
    """Seconds per forward of ``batch``: the best of ``rounds`` timed rounds (the least disturbed by other
    processes), together lasting about ``min_time_s``; uses the model-throughput bench's timer."""
    first = time_batches(model, batch, 2, autocast)  # warm-up, and the estimate that sizes the rounds
    iters = max(1, round(min_time_s / rounds / max(first, 1e-6)))
    return min(time_batches(model, batch, iters, autocast) for _ in range(rounds))


def raw_throughput(model: nn.Module, input_size: tuple[int, int], channels: int, *, batch_sizes: list[int],
                   min_time_s: float = 1.0, thread_counts: list[int] | None = None,
                   precisions: tuple[str, ...] = ("float32",)) -> list[RawPoint]:
    """img/s of ``model`` for each precision, thread count, memory format and batch size (random input: the
    cost does not depend on it). Fewer threads than cores can win on a shared machine, where a 2-thread
    OpenMP barrier waits for a descheduled thread."""
    points, restore = [], torch.get_num_threads()
    for precision in precisions:
        net, autocast = as_served(model, precision)
        for threads in thread_counts or [restore]:
            torch.set_num_threads(threads)
            for name, memory_format in MEMORY_FORMATS.items():
                net = net.to(memory_format=memory_format)
                for batch_size in batch_sizes:
                    x = torch.randn(batch_size, channels, *input_size).to(memory_format=memory_format)
                    seconds = time_forward(net, x, min_time_s=min_time_s, autocast=autocast)
                    points.append(RawPoint(batch_size, name, batch_size / seconds, seconds * 1000, threads,
                                           precision))
    torch.set_num_threads(restore)
    model.to(memory_format=torch.contiguous_format)
    return points


def best(points: list[RawPoint], precision: str = "float32") -> RawPoint:
    return max((p for p in points if p.precision == precision), key=lambda p: p.img_per_s)


def raw_at_batch(points: list[RawPoint], batch_size: float, precision: str = "float32") -> float:
    """Best img/s (any format, thread count) at ``batch_size``, interpolated between the measured sizes."""
    by_size: dict[int, float] = {}
    for p in (p for p in points if p.precision == precision):
        by_size[p.batch_size] = max(by_size.get(p.batch_size, 0.0), p.img_per_s)
    sizes = sorted(by_size)
    return float(np.interp(batch_size, sizes, [by_size[s] for s in sizes]))


def plain_preprocess(data: bytes, pre: Preprocessing) -> torch.Tensor:
    """The plain path a user writes: full PIL decode, PIL bilinear resize, crop, float normalise."""
    image = Image.open(io.BytesIO(data)).convert(pre.color)
    height, width = pre.input_size
    if pre.resize_mode == "center_crop":
        scale = pre.resize_size / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    else:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    x = x.unsqueeze(-1) if x.ndim == 2 else x
    mean, std = torch.tensor(pre.mean), torch.tensor(pre.std)
    return ((x - mean) / std).permute(2, 0, 1).contiguous()


def decode_seconds(data: bytes, pre: Preprocessing, *, repeats: int = 50) -> float:
    """Median seconds of ``plain_preprocess`` on ``data`` (after two warm-up calls)."""
    for _ in range(2):
        plain_preprocess(data, pre)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plain_preprocess(data, pre)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def physical_limit(raw_img_per_s: float, decode_s: float) -> float:
    return 1.0 / (1.0 / raw_img_per_s + decode_s)


def measure(model: nn.Module, pre: Preprocessing, jpeg: bytes, *, batch_sizes: list[int], min_time_s: float,
            thread_counts: list[int] | None = None, decode_repeats: int = 50,
            precisions: tuple[str, ...] = ("float32",)) -> dict:
    """Raw points, decode cost and the physical limit (per precision; the top level is float32's) of one model,
    as a JSON-ready dict."""
    channels = 3 if pre.color == "RGB" else 1
    points = raw_throughput(model, pre.input_size, channels, batch_sizes=batch_sizes, min_time_s=min_time_s,
                            thread_counts=thread_counts, precisions=precisions)
    decode_s = decode_seconds(jpeg, pre, repeats=decode_repeats)
    per_precision = {p: {"best_raw": asdict(best(points, p)),
                         "physical_limit_img_per_s": physical_limit(best(points, p).img_per_s, decode_s)}
                     for p in precisions}
    return {"torch_threads": torch.get_num_threads(), "raw": [asdict(p) for p in points], "decode_ms": decode_s * 1000,
            **per_precision["float32"], "limits": per_precision}
