"""Each model's batch cap and memory format, chosen at start-up by timing it (``MACULA_TUNE=auto``, the default).

The best ones differ by model and CPU (a deep model may peak at a small batch in the contiguous format where a
shallower one peaks at 8-16 in channels_last), and a batch larger than the peak only adds latency. So before a
model's compiled forms are looked up (their cache key holds both choices) and before its warm-up, on the thread
that runs the model (the worker's main thread, or the inference thread), :func:`tune` times the eager forward of
random images at batch sizes 1, 2, 4, 8, 16 (up to ``MACULA_MAX_BATCH_CEILING``) in each memory format the
settings leave open, the formats interleaved at each size: one untimed round, then up to :data:`TIMED_ROUNDS`
timed ones, and the median per (format, size). :func:`choose` takes the format with the most images/s at its best
batch, and as the cap the smallest batch within :data:`TOLERANCE` of that rate (equal throughput, lower latency).

It is time-boxed (:func:`measure_samples`): a format stops growing its batch once the next size's forward is projected
past :data:`FORWARD_BUDGET_S`, and no further timed round starts once all forwards so far and the next round would
take longer than :data:`TOTAL_BUDGET_S` (at least one timed round always runs). The timings are kept in the
compile cache (``MACULA_COMPILE_CACHE``, ``<version>-<digest>.tuning.json``), keyed by checkpoint version, torch,
device, precision, thread count and what was timed, so a later start reads them instead of timing; a replica that
finds another timing the same key waits for its timings (a lock file). Where the cache cannot be written every
start times. Timings taken on a busy host are served but not kept: when the timed rounds of a typical (median)
format and size spread by more than ``MACULA_TUNE_MAX_SPREAD`` (25 %) of their median (:func:`spread`), the next
start times again.

A setting given wins and is not timed: ``MACULA_MAX_BATCH_SIZE`` fixes the cap (the formats are then timed up to
it), ``MACULA_CHANNELS_LAST`` the format. ``MACULA_TUNE=off``, and CUDA devices (where the fixed default pays and
a batch sweep would be long), use the fixed defaults: channels_last, the device's cap (settings.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .compiled import CompileCache, device_signature
from .inference import MEMORY_FORMATS, ModelRunner
from .settings import DEFAULT_TUNE_MAX_SPREAD, Settings

log = logging.getLogger("service.tuning")

SCHEME = "tune-v1"  # how timings are taken and kept: changes with this module
BATCH_SIZES = (1, 2, 4, 8, 16)
FORMATS = ("channels_last", "contiguous")  # in order of preference on a tie
TIMED_ROUNDS = 3
TOLERANCE = 0.05  # the cap: the smallest batch within 5 % of the best images/s
FORWARD_BUDGET_S = 1.0  # no larger batch for a format once its next forward is projected past this
TOTAL_BUDGET_S = 15.0  # no further timed round once all forwards would take longer than this

Timings = dict[str, dict[int, float]]  # memory format -> batch size -> median seconds per forward
Samples = dict[str, dict[int, list[float]]]  # memory format -> batch size -> seconds of each timed forward


@dataclass(frozen=True)
class Plan:
    """What the settings fix and what they leave to timing, on one device."""

    formats: tuple[str, ...]  # the candidate memory formats (one: fixed)
    max_batch_size: int | None  # the fixed cap, or None: chosen by timing up to ``ceiling``
    ceiling: int
    sources: dict[str, str]  # "max_batch_size" / "memory_format" -> "tuned" | "configured" | "default"
    max_spread: float = DEFAULT_TUNE_MAX_SPREAD  # more unsteady timings (:func:`spread`) are used but not kept

    @property
    def timed(self) -> bool:
        return len(self.formats) > 1 or self.max_batch_size is None

    @property
    def sizes(self) -> tuple[int, ...]:
        """The batch sizes timed: 1, 2, 4, 8, 16 below the limit (the fixed cap, else the ceiling), and the limit."""
        limit = self.max_batch_size or self.ceiling
        return tuple(sorted({size for size in BATCH_SIZES if size < limit} | {limit}))

    @property
    def first_batch_size(self) -> int:
        """The cap a runner holds until it is tuned (warm-up and compiled forms come after tuning)."""
        return self.max_batch_size or self.ceiling


def plan_for(settings: Settings, device: str) -> Plan:
    """What ``settings`` leave open on ``device``: nothing with ``tune=off`` or on CUDA (the fixed defaults)."""
    open_ = settings.tune == "auto" and not device.startswith("cuda")
    unset = "tuned" if open_ else "default"
    if settings.channels_last is None:
        formats, format_source = FORMATS if open_ else FORMATS[:1], unset
    else:
        formats, format_source = ("channels_last" if settings.channels_last else "contiguous",), "configured"
    if settings.max_batch_size is not None:
        batch, batch_source = settings.max_batch_size, "configured"
    else:
        batch, batch_source = (None if open_ else settings.batch_limits(device)[0]), unset
    return Plan(tuple(formats), batch, settings.max_batch_ceiling,
                {"max_batch_size": batch_source, "memory_format": format_source}, settings.tune_max_spread)


# ---------------------------------------------------------------------------------------------------- choosing


def choose(timings: Timings, tolerance: float = TOLERANCE) -> tuple[str, int]:
    """(memory format, batch cap) from median seconds per forward: the format with the most images/s at its best
    batch (the earlier in ``timings`` on a tie), and the smallest batch within ``tolerance`` of that rate."""
    rates = {fmt: {size: size / seconds for size, seconds in by_size.items()} for fmt, by_size in timings.items()
             if by_size}
    if not rates:
        raise ValueError("no timings to choose from")
    best_format = max(rates, key=lambda fmt: max(rates[fmt].values()))
    best = max(rates[best_format].values())
    cap = min(size for size, rate in rates[best_format].items() if rate >= (1 - tolerance) * best)
    return best_format, cap


def medians(samples: Samples) -> Timings:
    return {fmt: {size: statistics.median(times) for size, times in by_size.items()} for fmt, by_size in
            samples.items()}


def spread(samples: Samples) -> float:
    """How unsteady the timings are: the median over formats and sizes of (max - min) / median of the timed
    rounds; 0 with a single round (nothing to compare)."""
    spreads = [(max(times) - min(times)) / statistics.median(times) for by_size in samples.values()
               for times in by_size.values() if len(times) > 1]
    return statistics.median(spreads) if spreads else 0.0


def measure_samples(forward: Callable[[str, int], float], formats: Sequence[str], sizes: Sequence[int], *,
                    rounds: int = TIMED_ROUNDS, forward_budget_s: float = FORWARD_BUDGET_S,
                    total_budget_s: float = TOTAL_BUDGET_S) -> Samples:
    """Seconds of each timed ``forward(format, size)`` per format and size, formats interleaved at each size.

    The untimed first round picks the sizes: ascending, per format, while the next size's forward is projected
    (linearly from the last one) within ``forward_budget_s``. Then timed rounds, while every forward so far and
    the next round (as long as the last) stay within ``total_budget_s``; at least one."""
    picked: dict[str, list[int]] = {fmt: [] for fmt in formats}
    last: dict[str, tuple[int, float]] = {}  # format -> (size, seconds) of its largest size so far
    stopped: set[str] = set()
    spent = 0.0
    for size in sizes:
        for fmt in formats:
            if fmt in last and last[fmt][1] * size / last[fmt][0] > forward_budget_s:
                stopped.add(fmt)
            if fmt in stopped:
                continue
            last[fmt] = (size, forward(fmt, size))
            picked[fmt].append(size)
            spent += last[fmt][1]
    samples: Samples = {fmt: {size: [] for size in picked[fmt]} for fmt in formats}
    round_s = spent
    for done in range(rounds):
        if done and spent + round_s > total_budget_s:
            break
        round_s = 0.0
        for size in sizes:
            for fmt in formats:
                if size in samples[fmt]:
                    seconds = forward(fmt, size)
                    samples[fmt][size].append(seconds)
                    round_s += seconds
        spent += round_s
    return samples


# ------------------------------------------------------------------------------------------------------ timing


def time_forward(runner: ModelRunner, model: torch.nn.Module, memory_format: str, pixels: np.ndarray) -> float:
    """Seconds of one plain eager forward of ``pixels`` by ``runner`` with ``model`` in ``memory_format`` (the
    runner's own model and format are back afterwards). Call on the runner's thread."""
    saved = runner.model, runner.memory_format
    runner.model, runner.memory_format = model, MEMORY_FORMATS[memory_format]
    try:
        started = time.perf_counter()
        runner.run(pixels)
        return time.perf_counter() - started
    finally:
        runner.model, runner.memory_format = saved


class FormatTimer:
    """``timer(format, size)``: seconds of one forward of random images, for :func:`measure_samples`. Holds the runner's
    model in each format (a copy for each format it is not in)."""

    def __init__(self, runner: ModelRunner, formats: Sequence[str]) -> None:
        self.runner = runner
        self.models = {fmt: runner.model if fmt == runner.memory_format_name
                       else copy.deepcopy(runner.model).to(memory_format=MEMORY_FORMATS[fmt]) for fmt in formats}
        self._pixels: dict[int, np.ndarray] = {}

    def __call__(self, memory_format: str, size: int) -> float:
        if size not in self._pixels:
            shape = (size, *self.runner.input_shape)
            self._pixels[size] = np.random.default_rng(size).integers(0, 256, shape, dtype=np.uint8)
        return time_forward(self.runner, self.models[memory_format], memory_format, self._pixels[size])


# ------------------------------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class TuneKey:
    """Everything the timings depend on."""

    version: str  # the checkpoint's
    scheme: str
    torch: str
    device: str  # service.compiled.device_signature
    dtype: str  # what the runner computes in
    threads: int  # CPU: the runner's thread's torch threads; CUDA: 0
    formats: tuple[str, ...]  # what was timed
    sizes: tuple[int, ...]

    @property
    def stem(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.version}-{digest}"


def tune_key(runner: ModelRunner, plan: Plan) -> TuneKey:
    """The key of ``runner``'s timings under ``plan`` (call on the runner's thread: its thread count counts)."""
    threads = torch.get_num_threads() if runner.device.type == "cpu" else 0
    return TuneKey(runner.meta.version, SCHEME, torch.__version__, device_signature(runner.device), runner.precision,
                   threads, plan.formats, plan.sizes)


def read_timings(cache: CompileCache, key: TuneKey) -> Timings | None:
    """The kept timings of ``key``, or None (none yet, or unreadable or not of this key: then it is timed again)."""
    try:
        kept = json.loads(cache.tuning(key).read_text())
        timings = {fmt: {int(size): float(seconds) for size, seconds in kept["seconds"][fmt].items()}
                   for fmt in key.formats}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    valid = all(by_size and set(by_size) <= set(key.sizes) and all(s > 0 for s in by_size.values())
                for by_size in timings.values())
    return timings if valid else None


def verdict_json(key: TuneKey, timings: Timings, seconds: float, unsteadiness: float = 0.0) -> str:
    memory_format, cap = choose(timings)
    rates = {fmt: {str(size): round(size / s, 2) for size, s in by_size.items()} for fmt, by_size in timings.items()}
    return json.dumps({"memory_format": memory_format, "max_batch_size": cap, "images_per_s": rates,
                       "seconds": {fmt: {str(size): s for size, s in by_size.items()} for fmt, by_size in
                                   timings.items()},
                       "tuning_s": round(seconds, 2), "spread": round(unsteadiness, 3), "key": asdict(key)},
                      indent=1) + "\n"


# ---------------------------------------------------------------------------------------------------- tune


def tune(runner: ModelRunner, plan: Plan, cache: CompileCache) -> None:
    """Give ``runner`` its batch cap and memory format as ``plan`` says: fixed ones as they are, open ones from
    the kept timings or, where none are kept, by timing it now. Call on the runner's thread, before its compiled
    forms are looked up and before its warm-up."""
    if runner.compiled is not None:
        raise RuntimeError(f"{runner.name}: tune before the compiled forms are loaded (their key holds the choice)")
    timer, memory_format, cap = None, plan.formats[0], plan.max_batch_size
    if plan.timed:
        key = tune_key(runner, plan)
        timings = read_timings(cache, key)
        if timings is not None:
            log.info("%s: batch sizes and memory formats as timed before (%s)", runner.name, cache.tuning(key))
        else:
            timer = FormatTimer(runner, plan.formats)
            timings = time_and_keep(runner, timer, plan, key, cache)
        memory_format, chosen = choose(timings)
        cap = chosen if cap is None else cap
        log.info("%s: serving %s, batches up to %d (%s)", runner.name, memory_format, cap, describe(timings))
    apply(runner, cap, memory_format, plan.sources, timer.models.get(memory_format) if timer is not None else None)


def apply(runner: ModelRunner, max_batch_size: int, memory_format: str, sources: dict[str, str],
          model: torch.nn.Module | None = None) -> None:
    """Give ``runner`` this cap and format (``model``: its model already in that format, if at hand)."""
    runner.max_batch_size, runner.tuning = max_batch_size, dict(sources)
    if memory_format != runner.memory_format_name:
        runner.use_memory_format(memory_format, model)


def time_and_keep(runner: ModelRunner, timer: FormatTimer, plan: Plan, key: TuneKey, cache: CompileCache) -> Timings:
    """Time ``runner`` and keep the timings; under the key's lock file, so that replicas sharing the cache time
    once (the second waits, then reads the first one's). Without a writable cache: time, and say so."""
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(cache.locked(key, "tuning"))
    except OSError as exc:
        log.info("%s: the compile cache cannot keep the timings (%s): timing at every start; set "
                 "MACULA_COMPILE_CACHE to a writable directory, or MACULA_MAX_BATCH_SIZE and MACULA_CHANNELS_LAST",
                 runner.name, exc)
    with lock:
        timings = read_timings(cache, key)  # another replica's, timed while this one waited for the lock
        if timings is not None:
            return timings
        started = time.perf_counter()
        samples = measure_samples(timer, plan.formats, plan.sizes)
        seconds, timings, unsteadiness = time.perf_counter() - started, medians(samples), spread(samples)
        if unsteadiness > plan.max_spread:
            log.warning("%s: timings unsteady (the rounds spread by %.0f %% of their median: a busy host?): served "
                        "now but not kept, the next start times again", runner.name, 100 * unsteadiness)
            return timings
        kept = cache.write_atomic(cache.tuning(key), verdict_json(key, timings, seconds, unsteadiness))
        log.info("%s: timed %s at batch sizes %s in %.1f s%s", runner.name, " and ".join(plan.formats),
                 ", ".join(map(str, plan.sizes)), seconds,
                 f"; kept in {cache.tuning(key)}" if kept else "; not kept (the cache is not writable)")
        return timings


def describe(timings: Timings) -> str:
    """``channels_last 1: 40.1, 2: 52.3 img/s; contiguous ...``"""
    return "; ".join(f"{fmt} " + ", ".join(f"{size}: {size / s:.1f}" for size, s in by_size.items()) + " img/s"
                     for fmt, by_size in timings.items())

