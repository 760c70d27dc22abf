"""The running service: its models, batcher, decode pool, audit store and metrics, and the classify path
that every predict route shares (reserve queue room → decode in the pool → queue → await the results)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from starlette.requests import Request

from .audit.factory import build_store, input_keeper
from .batching import Batcher
from .codec import DecodedImage, preprocess
from .errors import ServiceError, not_ready
from .inference import ImageResult, ModelRunner
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("service")


class ClientGone(Exception):
    """The client disconnected while its images were queued or running."""


@dataclass
class Classified:
    """The outcome of one predict call, before formatting."""

    model: ModelRunner
    images: list[DecodedImage]
    results: list[ImageResult]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def find_checkpoints(model_dir: Path) -> dict[str, Path]:
    """Every ``*.safetensors`` in ``model_dir``, by file stem."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model dir {model_dir} does not exist")
    return {p.stem: p for p in sorted(model_dir.glob("*.safetensors"))}


class Service:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.device = settings.resolved_device()
        self.max_batch_size, self.max_batch_delay = settings.batch_limits(self.device)
        self.runners: dict[str, ModelRunner] = {}
        self.default_model: str | None = None
        self.batcher: Batcher | None = None
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers(), thread_name_prefix="macula-decode")
        self.audit = build_store(settings, metrics)        # audit trail: service/audit
        self.keep_input = input_keeper(settings, self.audit)
        self.ready = False
        self.draining = False

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Load every checkpoint (blocking; run it in a thread) and start the inference thread."""
        paths = find_checkpoints(self.settings.model_dir)
        if not paths:
            raise FileNotFoundError(f"no *.safetensors checkpoints in {self.settings.model_dir}")
        for name, path in paths.items():
            self.runners[name] = ModelRunner(name, path, device=self.device, amp_dtype=self.settings.amp_dtype,
                                             channels_last=self.settings.channels_last)
            meta = self.runners[name].meta
            self.metrics.set_model_info(name, meta.version, meta.arch["name"], meta.arch.get("attention"))
            log.info("loaded model %r (%s, version %s, %s) from %s", name, meta.arch["name"], meta.version,
                     self.runners[name].precision, path)
        self.default_model = self._pick_default()
        threads = self.settings.torch_threads or torch.get_num_threads()
        self.batcher = Batcher(self._run_batch, list(self.runners), max_size=self.max_batch_size,
                               max_delay=self.max_batch_delay, max_queue=self.settings.max_queue,
                               timeout_s=self.settings.request_timeout_s, torch_threads=threads, metrics=self.metrics)
        self.batcher.start()

    def _pick_default(self) -> str:
        wanted = self.settings.default_model
        if wanted is not None:
            if wanted not in self.runners:
                raise ValueError(f"default model {wanted!r} is not in {self.settings.model_dir} "
                                 f"(found: {', '.join(self.runners)})")
            return wanted
        return "demo" if "demo" in self.runners else min(self.runners)

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        for runner in self.runners.values():
            await asyncio.wrap_future(self.batcher.call(runner.warm_up, self.max_batch_size))
        await asyncio.to_thread(self.audit.start)   # opens the database (and migrates it): not on the event loop
        self.ready = True
        self.metrics.set_ready(True)
        log.info("ready: %d model(s) on %s, batches up to %d, delay %.1f ms", len(self.runners), self.device,
                 self.max_batch_size, 1000 * self.max_batch_delay)

    def begin_drain(self) -> None:
        """Stop taking new work (SIGTERM): readiness goes 503 at once; accepted requests still finish."""
        self.draining = True
        self.metrics.set_ready(False)

    async def stop(self) -> None:
        self.begin_drain()
        if self.batcher is not None:
            finished = await asyncio.to_thread(self.batcher.stop, self.settings.drain_timeout_s)
            if not finished:
                log.error("inference queue not drained within %.0f s", self.settings.drain_timeout_s)
        await asyncio.to_thread(self.audit.close, 10.0)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ request path

    @property
    def accepting(self) -> bool:
        return self.ready and not self.draining

    def runner(self, name: str | None) -> ModelRunner:
        name = name or self.default_model
        if name not in self.runners:
            known = ", ".join(self.runners) or "none"
            raise ServiceError(404, "model_not_found", f"unknown model {name!r}; served models: {known}")
        return self.runners[name]

    def _run_batch(self, model: str, inputs, attention: bool) -> list[ImageResult]:
        return self.runners[model].run(inputs, attention)

    async def in_pool(self, fn, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    async def _decode(self, runner: ModelRunner, data: bytes) -> DecodedImage:
        decoded, seconds = await self.in_pool(_timed_preprocess, data, self.settings.max_image_pixels, runner,
                                              self.keep_input)
        self.metrics.observe_preprocess(runner.name, seconds)
        return decoded

    def check_accepting(self) -> None:
        if not self.accepting:
            raise not_ready()

    async def classify(self, request: Request, runner: ModelRunner, blobs: list[bytes], *,
                       attention: bool) -> Classified:
        """Decode ``blobs`` in the pool, queue them, await their results (or the client leaving)."""
        self.check_accepting()
        self.batcher.reserve(runner.name, len(blobs))
        try:
            images = await asyncio.gather(*(self._decode(runner, b) for b in blobs))
        except BaseException:
            self.batcher.release(runner.name, len(blobs))
            raise
        futures = self.batcher.submit(runner.name, [img.pixels for img in images], attention=attention)
        results = await _await_or_disconnect(futures, request)
        self.metrics.observe_predictions(runner.name, (float(r.scores.max()) for r in results))
        return Classified(runner, images, results)


def _timed_preprocess(data: bytes, max_pixels: int, runner: ModelRunner, keep=None) -> tuple[DecodedImage, float]:
    """Decode + preprocess one image in the pool; the time excludes waiting for a pool thread."""
    start = time.perf_counter()
    decoded = preprocess(data, max_pixels=max_pixels, pre=runner.meta.preprocessing, keep=keep)
    return decoded, time.perf_counter() - start


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body was already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _await_or_disconnect(futures: list[asyncio.Future], request: Request) -> list[ImageResult]:
    """All results, or :class:`ClientGone` if the client leaves first (its queued images are then skipped)."""
    gathered = asyncio.gather(*futures)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled
        watcher.cancel()
        gathered.cancel()  # cancels its children; its outcome is then read by _consume, so nothing is logged
        gathered.add_done_callback(_consume)
        for future in futures:
            future.cancel()  # no-op for finished ones; the batcher skips cancelled ones still queued
    if gathered not in done:
        raise ClientGone()
    return gathered.result()
