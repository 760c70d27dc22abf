"""How requests are scheduled: per-model queues, batch collection, deadlines, and handing results back.

What the model does lives in ``inference.py``; this module only decides *which* images run together and
*when* (the split LitServe makes between its ``LitAPI`` and its batching loop).

Rule: the moment the inference thread is free it runs everything queued for a model, up to that model's batch
cap (``max_size``, or what :meth:`Batcher.set_max_size` gave it: service/tuning.py chooses one per model). It waits
for more only while more images for that model are being decoded right now (they will be queued within
milliseconds) and only until ``max_delay`` after the *first* queued image arrived, so a lone client never waits
out a delay for a batch of one, and under load batches fill while the previous batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("service.batching")


class QueueFull(Exception):
    """No room in the model's queue for the request's images."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its images were run."""


class InferenceFailed(Exception):
    """The model failed on this image alone (the cause is logged, never shown)."""

    def __init__(self) -> None:
        super().__init__("inference failed for this image; the failure was logged on the server")


class Unavailable(Exception):
    """The model cannot run at all right now (its worker process is restarting): ``run_batch`` raises it, and every
    image of the batch gets it as it is; the batch is not split (no half could run either)."""


class Cancellable(Protocol):
    def cancelled(self) -> bool: ...


@dataclass(eq=False)
class Pending:
    """One queued image: its input, the future its request awaits, and its timing."""

    inputs: Any  # np.ndarray: one image's uint8 (H, W, C) pixels
    future: Cancellable  # asyncio.Future in the service; cancelled when the client went away
    arrival: float  # time.monotonic() when queued
    deadline: float  # monotonic time after which it is answered 504 instead of computed
    attention: bool = False
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class Collected:
    """What :func:`collect_batch` decided: run ``batch`` now, answer ``expired`` with 504, drop ``cancelled``,
    keep ``rest`` queued; ``wait`` > 0 means "nothing to run yet, look again in ``wait`` seconds"."""

    batch: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)
    cancelled: list[Pending] = field(default_factory=list)
    rest: list[Pending] = field(default_factory=list)
    wait: float = 0.0


def collect_batch(queue: Sequence[Pending], *, now: float, max_size: int, max_delay: float,
                  expecting: int = 0) -> Collected:
    """Decide the next batch from a queue snapshot (oldest first). Pure: no clocks, no locks, no I/O.

    ``expecting`` is how many more images for this model are being decoded; only while it is > 0 is it worth
    holding a non-full batch back, and never past ``max_delay`` after the first live entry arrived.
    """
    out = Collected()
    live: list[Pending] = []
    for entry in queue:
        if entry.future.cancelled():
            out.cancelled.append(entry)
        elif entry.deadline <= now:
            out.expired.append(entry)
        else:
            live.append(entry)
    if not live:
        return out
    ready_at = live[0].arrival + max_delay
    if len(live) >= max_size or expecting <= 0 or now >= ready_at:
        out.batch, out.rest = live[:max_size], live[max_size:]
    else:
        out.rest, out.wait = live, ready_at - now
    return out


@dataclass
class Job:
    """A callable to run on the inference thread (warm-up), with the future that gets its result."""

    fn: Callable[[], Any]
    future: Future


def _deliver(entry: Pending, result: Any = None, error: BaseException | None = None) -> None:
    """Hand a result back on the request's event loop (thread-safe)."""

    def settle() -> None:
        future: asyncio.Future = entry.future  # type: ignore[assignment]
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    if entry.loop is None:
        settle()
        return
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        entry.loop.call_soon_threadsafe(settle)


class Batcher:
    """Per-model bounded queues served by ONE inference thread that owns torch's intra-op threads.

    ``run_batch(model, inputs (N, C, H, W), attention) -> list`` of N per-image results runs on that thread.
    ``max_size`` is every model's batch cap until :meth:`set_max_size` gives a model its own.
    """

    def __init__(self, run_batch: Callable[[str, np.ndarray, bool], list[Any]], models: Sequence[str], *,
                 max_size: int, max_delay: float, max_queue: int, timeout_s: float,
                 torch_threads: int | None = None, metrics: Any = None) -> None:
        self.run_batch, self.metrics = run_batch, metrics
        self.max_size, self.max_delay, self.max_queue, self.timeout_s = max_size, max_delay, max_queue, timeout_s
        self.torch_threads = torch_threads
        self._queues: dict[str, deque[Pending]] = {name: deque() for name in models}
        self._max_sizes: dict[str, int] = dict.fromkeys(models, max_size)
        self._expecting: dict[str, int] = dict.fromkeys(models, 0)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._jobs: deque[Job] = deque()

    # ------------------------------------------------------------------ event-loop side

    def reserve(self, model: str, count: int) -> None:
        """Claim queue room for ``count`` images about to be decoded, or raise :class:`QueueFull`."""
        with self._cond:
            used = len(self._queues[model]) + self._expecting[model]
            if used + count > self.max_queue:
                raise QueueFull(f"queue for model {model!r} is full ({used}/{self.max_queue} images); retry shortly")
            self._expecting[model] += count

    def release(self, model: str, count: int) -> None:
        """Give back a reservation whose images will not be queued (decode failed)."""
        with self._cond:
            self._expecting[model] -= count
            self._cond.notify()

    def submit(self, model: str, inputs: Sequence[np.ndarray], *, attention: bool,
               deadline: float | None = None) -> list[asyncio.Future]:
        """Queue reserved images; returns one future per image (resolved on this event loop). ``deadline``
        (``time.monotonic()``) is the request's; by default ``timeout_s`` from now."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + self.timeout_s if deadline is None else deadline
        entries = [Pending(x, loop.create_future(), now, deadline, attention, loop) for x in inputs]
        with self._cond:
            self._expecting[model] -= len(entries)
            self._queues[model].extend(entries)
            self._set_depth(model)
            self._cond.notify()
        return [entry.future for entry in entries]  # type: ignore[misc]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="macula-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish everything queued, then stop the thread (blocking). True if it finished in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the inference thread (e.g. a warm-up) before any further batch."""
        future: Future = Future()
        with self._cond:
            self._jobs.append(Job(lambda: fn(*args), future))
            self._cond.notify()
        return future

    def set_max_size(self, model: str, size: int) -> None:
        """Batches of ``model`` take at most ``size`` images from now on."""
        if size < 1:
            raise ValueError(f"a batch cap must be at least 1, got {size}")
        with self._cond:
            self._max_sizes[model] = size
            self._cond.notify()

    def max_size_of(self, model: str) -> int:
        with self._cond:
            return self._max_sizes[model]

    def queued(self, model: str) -> int:
        with self._cond:
            return len(self._queues[model])

    # ------------------------------------------------------------------ inference thread

    def _worker(self) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        while True:
            picked = self._next()
            if picked is None:
                return
            if isinstance(picked, Job):
                self._run_job(picked)
                continue
            model, collected = picked
            self._drop(model, collected)
            if collected.batch:
                self._run(model, collected.batch)

    @staticmethod
    def _run_job(job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the job
            job.future.set_exception(exc)

    def _next(self) -> Any:
        """Block until there is a job, or a model has work to run or drop; None once stopping with nothing left."""
        with self._cond:
            while True:
                if self._jobs:
                    return self._jobs.popleft()
                heads = [(q[0].arrival, name) for name, q in self._queues.items() if q]
                if not heads:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                model = min(heads)[1]
                collected = collect_batch(self._queues[model], now=time.monotonic(), max_size=self._max_sizes[model],
                                          max_delay=self.max_delay, expecting=self._expecting[model])
                self._queues[model] = deque(collected.rest)
                self._set_depth(model)
                if collected.batch or collected.expired or collected.cancelled:
                    return model, collected
                self._cond.wait(collected.wait)

    def _set_depth(self, model: str) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(model, len(self._queues[model]))

    def _drop(self, model: str, collected: Collected) -> None:
        """Answer expired entries with 504 (counted where the response is made); cancelled ones need nothing."""
        for entry in collected.expired:
            _deliver(entry, error=DeadlineExceeded(f"the request's deadline ({self.timeout_s:g} s) passed before its "
                                                   "images were run"))
        if collected.cancelled:
            log.debug("skipped %d queued image(s) of %r whose client went away", len(collected.cancelled), model)

    def _run(self, model: str, batch: list[Pending]) -> None:
        start = time.monotonic()
        if self.metrics is not None:
            for entry in batch:
                self.metrics.observe_queue_wait(model, start - entry.arrival)
        self._run_isolating(model, batch)

    def _run_isolating(self, model: str, batch: list[Pending]) -> None:
        """Run a batch; if it raises, bisect so that only the images that fail on their own get an error.

        This is the one batch-splitting mechanism: a poisoned image and a CUDA out-of-memory batch both end here
        (the runner frees its cached memory before re-raising an OOM, so the halves start clean)."""
        try:
            start = time.monotonic()
            results = self.run_batch(model, np.stack([e.inputs for e in batch]), any(e.attention for e in batch))
            if len(results) != len(batch):
                raise RuntimeError(f"model {model!r} returned {len(results)} results for {len(batch)} inputs")
        except Unavailable as exc:
            for entry in batch:
                _deliver(entry, error=exc)
            return
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any batch
            if len(batch) > 1:
                half = len(batch) // 2
                log.warning("batch of %d failed for %r (%s); retrying as %d + %d", len(batch), model,
                            type(exc).__name__, half, len(batch) - half)
                self._run_isolating(model, batch[:half])
                self._run_isolating(model, batch[half:])
                return
            log.error("inference failed for one image of model %r: %r", model, exc, exc_info=exc)
            _deliver(batch[0], error=InferenceFailed())
            return
        if self.metrics is not None:
            self.metrics.observe_batch(model, len(batch), time.monotonic() - start)
        for entry, result in zip(batch, results, strict=True):
            _deliver(entry, result)
