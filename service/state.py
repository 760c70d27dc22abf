"""The running service: its models, batcher, decode pool, audit store and metrics, and :meth:`Service.predict`, the one
predict path every route calls (validate → reserve queue room → decode in the pool → queue → await the results →
format → audit). Routes only parse requests and format answers; nothing here knows HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import formatting, masks
from .audit.factory import build_store, input_keeper
from .batching import Batcher, DeadlineExceeded
from .codec import DecodedImage, ImageTooLarge, finish, probe
from .compiled import CompileCache
from .compiling import Compiler
from .decoding import DecodePool, Share
from .drain import Drain
from .inference import ImageResult, ModelRunner
from .inference_process import InferenceProcess
from .metrics import Metrics
from .settings import Settings
from .tuning import plan_for, tune

log = logging.getLogger("service")


class ClientGone(Exception):
    """The client disconnected while its images were queued or running."""


class ModelNotFound(Exception):
    pass


class InvalidParameter(Exception):
    pass


class NotReady(Exception):
    def __init__(self, detail: str = "the service is not ready (starting up or shutting down)",
                 reason: str = "starting") -> None:
        super().__init__(detail)
        self.reason = reason


class MasksTooLarge(Exception):
    pass


@dataclass
class Prediction:
    """The outcome of one predict call: the raw results (for routes that format them their own way) and
    ``items``, the per-image JSON of ``/v1`` predict that the audit record holds too."""

    model: ModelRunner
    images: list[DecodedImage]
    results: list[ImageResult]
    items: list[dict[str, Any]]
    top_k: int
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
        self.max_batch_delay = settings.batch_limits(self.device)[1]
        self.tuning_plan = plan_for(settings, self.device)  # each model's batch cap and memory format: tuning.py
        self.runners: dict[str, ModelRunner] = {}
        self.default_model: str | None = None
        self.batcher: Batcher | None = None
        self.decode_pool = DecodePool(settings.decode_workers(), budget_bytes=settings.decode_memory_bytes)
        self.audit = build_store(settings, metrics)            # the audit trail: service/audit
        self.keep_input = input_keeper(settings, self.audit)   # MACULA_AUDIT_INPUTS, made in the decode step
        # The compiled forms' builder, in thread mode; the inference worker process has its own (service/worker.py).
        self.compiler = None if settings.inference_process else Compiler(settings, metrics)
        self.process: InferenceProcess | None = None  # the inference worker (settings.inference_process)
        self.status = "starting"  # what the start is doing now (readiness reason)
        self.start_error: BaseException | None = None
        self._start_task: asyncio.Task | None = None
        self.ready = False
        self.drain = Drain(settings.drain_timeout_s, on_begin=lambda: metrics.set_ready(False))

    # ------------------------------------------------------------------ lifecycle

    def begin_start(self) -> asyncio.Task:
        """Start loading in the background (the port opens meanwhile; /readyz says why it is not ready yet)."""
        self._start_task = asyncio.ensure_future(self.start())
        self._start_task.add_done_callback(self._started)
        return self._start_task

    async def wait_started(self) -> None:
        """Return once ready; raise what stopped the start."""
        await asyncio.shield(self._start_task)

    def _started(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.start_error = task.exception()
            log.error("the service could not start: %s", self.start_error, exc_info=self.start_error)

    async def start(self) -> None:
        """Load and warm up every model, in the inference worker process (``inference_process``, where the forward
        runs at its raw speed: docs/benchmarks.md) or in this process; then serve."""
        self.drain.loop = asyncio.get_running_loop()
        paths = await asyncio.to_thread(find_checkpoints, self.settings.model_dir)
        if not paths:
            raise FileNotFoundError(f"no *.safetensors checkpoints in {self.settings.model_dir}")
        self.default_model = self._pick_default(list(paths))
        in_process = self.settings.inference_process
        threads = None if in_process else self.settings.torch_threads or torch.get_num_threads()
        self.batcher = Batcher(self._run_batch, list(paths), max_size=self.tuning_plan.first_batch_size,
                               max_delay=self.max_batch_delay, max_queue=self.settings.max_queue,
                               timeout_s=self.settings.request_timeout_s, torch_threads=threads, metrics=self.metrics)
        self.batcher.start()
        if in_process:
            self.process = InferenceProcess(self.settings, paths, metrics=self.metrics, on_change=self._publish_ready)
            self.process.start()
            self.runners = await asyncio.to_thread(self.process.wait_ready)
        else:
            await self._load_in_thread(paths, threads)
        for name, runner in self.runners.items():
            meta = runner.meta
            self.metrics.set_model_info(name, meta.version, meta.arch["name"], meta.arch.get("attention"))
            self.metrics.set_model_tuning(name, runner.max_batch_size, runner.memory_format_name)
            self.batcher.set_max_size(name, runner.max_batch_size)
            if runner.detector is not None:  # exported at 0 from the start, so rate() has data
                self.metrics.unfamiliar_inputs_total.labels(name)
            log.info("loaded model %r (%s, version %s, %s, %s, batches up to %d) from %s", name, meta.arch["name"],
                     meta.version, runner.precision, runner.memory_format_name, runner.max_batch_size, runner.path)
        self.status = "opening the audit store"
        await asyncio.to_thread(self.audit.start)   # opens (and migrates) the database: not on the event loop
        self.ready = True
        self._publish_ready()
        if self.compiler is not None:
            self.compiler.start_background()  # forms not in the cache: built aside, swapped in when ready
        log.info("ready: %d model(s) on %s%s, batch delay %.1f ms", len(self.runners), self.device,
                 " in the inference worker process" if in_process else "", 1000 * self.max_batch_delay)

    async def _load_in_thread(self, paths: dict[str, Path], threads: int) -> None:
        """Load in a helper thread; choose each model's batch cap and memory format, serve the cached compiled
        forms and warm up, on the inference thread (``inference_process=false``; the worker process does the same
        for itself)."""
        plan, cache, compiler = self.tuning_plan, CompileCache(self.settings.compile_cache_dir()), self.compiler
        assert compiler is not None  # thread mode
        for name, path in paths.items():
            self.status = f"loading: model {name!r}"
            self.runners[name] = await asyncio.to_thread(
                ModelRunner, name, path, device=self.device, amp_dtype=self.settings.amp_dtype,
                channels_last=plan.formats[0] == "channels_last", max_batch_size=plan.first_batch_size)
        for name, runner in self.runners.items():
            if plan.timed:
                self.status = f"warming up: model {name!r} (timing batch sizes and memory formats)"
            await asyncio.wrap_future(self.batcher.call(tune, runner, plan, cache))
        compiler.bind(list(self.runners.values()), self.batcher.call, threads)
        self.status = "loading the compiled forms"
        await asyncio.to_thread(compiler.load_cached)  # a warm compile cache: compiled before warm-up
        for name, runner in self.runners.items():
            self.status = f"warming up: model {name!r}"
            await asyncio.wrap_future(self.batcher.call(runner.warm_up, runner.max_batch_size))

    def _pick_default(self, names: list[str]) -> str:
        wanted = self.settings.default_model
        if wanted is not None:
            if wanted not in names:
                raise ValueError(f"default model {wanted!r} is not in {self.settings.model_dir} "
                                 f"(found: {', '.join(names)})")
            return wanted
        return "demo" if "demo" in names else min(names)

    def _publish_ready(self) -> None:
        self.metrics.set_ready(self.accepting)

    def begin_drain(self) -> None:
        """Stop taking new work (SIGTERM): readiness goes 503 at once; accepted requests still finish, and those
        not finished shortly before ``drain_timeout_s`` are answered 503 ``not_ready`` (service/drain.py)."""
        self.drain.begin()

    async def stop(self) -> None:
        self.begin_drain()
        if self.compiler is not None:
            await asyncio.to_thread(self.compiler.stop)
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()  # still loading: nothing was accepted yet
        if self.batcher is not None:
            finished = await asyncio.to_thread(self.batcher.stop, self.settings.drain_timeout_s)
            if not finished:
                log.error("inference queue not drained within %.0f s", self.settings.drain_timeout_s)
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
        await asyncio.to_thread(self.audit.close, 10.0)
        self.decode_pool.shutdown()

    # ------------------------------------------------------------------ request path

    @property
    def serving(self) -> bool:
        """Every model loaded and warmed up, and the inference worker (if any) up."""
        return self.ready and (self.process is None or self.process.ready)

    @property
    def accepting(self) -> bool:
        """Ready for new work (``/readyz``): serving and not draining."""
        return self.serving and not self.drain.draining

    def not_ready_reason(self) -> tuple[str, str]:
        """(reason, what is going on, for a human) while not accepting: the reason is one of ``loading``,
        ``warming up``, ``starting``, ``restarting``, ``failed``, ``draining``."""
        if self.drain.draining:
            return "draining", "draining: the service is shutting down"
        if self.start_error is not None:
            return "failed", f"the service could not start: {self.start_error}"
        process = self.process
        status = process.reason if process is not None and process.state != "ready" else self.status
        if process is not None and process.state == "restarting":
            return "restarting", status
        return status.split(":")[0] if status.startswith(("loading", "warming up")) else "starting", status

    def check_accepting(self) -> None:
        """Raise :class:`NotReady` (with the reason) unless the current request may start: the service is serving
        and not draining, or the request arrived before the drain began (:meth:`Drain.admits`)."""
        if not (self.serving and self.drain.admits()):
            reason, detail = self.not_ready_reason()
            raise NotReady(detail, reason)

    def runner(self, name: str | None) -> ModelRunner:
        name = name or self.default_model
        if name not in self.runners:
            known = ", ".join(self.runners) or "none"
            raise ModelNotFound(f"unknown model {name!r}; served models: {known}")
        return self.runners[name]

    def _run_batch(self, model: str, inputs: Any, attention: bool) -> list[ImageResult]:
        return self.runners[model].run(inputs, attention)

    async def in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking ``fn(*args)`` on a decode-pool thread, in a turn of its own."""
        return await self.decode_pool.run(self.decode_pool.share(), fn, *args)

    async def predict(self, model: str | None, blobs: Sequence[bytes], *, route: str, top_k: int | None = None,
                      attention: bool = False, original_size: bool = False, modules: Sequence[str] | None = None,
                      until_gone: Callable[[], Awaitable[Any]] | None = None) -> Prediction:
        """Classify ``blobs`` (encoded images) with ``model`` (None: the default). The request's deadline
        (``request_timeout_s`` from now) covers decoding, queueing and inference; ``until_gone`` returns when the
        client has left (its queued images are then skipped: :class:`ClientGone`). ``modules``: return only these
        attention modules' masks (implies ``attention``)."""
        started, deadline = time.perf_counter(), time.monotonic() + self.settings.request_timeout_s
        if not self.ready:  # draining is no reason here: check_accepting took this request (it arrived before the
            raise NotReady("loading models: the service is starting up")  # signal) and its body was read since
        runner = self.runner(model)
        k, modules = self._top_k(runner, top_k), masks.select_modules(runner, modules)
        attention = attention or modules is not None
        work = asyncio.ensure_future(self._classify(runner, blobs, attention and runner.has_attention,
                                                    original_size and attention, deadline, modules))
        images, results = await _first_of(work, until_gone)
        items = formatting.predictions(runner, images, results, k=k, attention=attention)
        if attention:
            await masks.add_masks(self.decode_pool, images, results, items, original_size=original_size,
                                  modules=modules, max_side=self.settings.max_mask_side)
        prediction = Prediction(runner, images, results, items, k)
        await self._record(formatting.audit_record(prediction, route=route, started=started),
                           [image.kept for image in images])
        return prediction

    async def _record(self, record: dict[str, Any], inputs: list[Any]) -> None:
        """Hand the finished record (and the kept inputs) to the audit store: the one place the predict path does.
        Best-effort: queued. Durable (``MACULA_AUDIT_DURABLE``): committed before the answer, or StoreUnavailable
        (503 ``audit_unavailable``)."""
        await self.audit.save(record, inputs)

    @staticmethod
    def _top_k(runner: ModelRunner, top_k: int | None) -> int:
        classes = runner.meta.num_classes
        if top_k is None:
            return min(5, classes)
        if not 1 <= top_k <= classes:
            raise InvalidParameter(f"top_k must be between 1 and {classes}, got {top_k}")
        return top_k

    async def _classify(self, runner: ModelRunner, blobs: Sequence[bytes], attention: bool, original_size: bool,
                        deadline: float, modules: list[str] | None = None
                        ) -> tuple[list[DecodedImage], list[ImageResult]]:
        """Reserve queue room, decode within the deadline, check the mask budget, queue, await the results."""
        self.batcher.reserve(runner.name, len(blobs))
        try:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    images = await self._decode_all(runner, blobs)
            except TimeoutError:
                raise DeadlineExceeded(f"the request's deadline ({self.settings.request_timeout_s:g} s) passed "
                                       "while its images were being decoded") from None
            if original_size:
                self._check_mask_budget(images, len(modules) if modules is not None else len(runner.attention_modules))
        except BaseException:
            self.batcher.release(runner.name, len(blobs))
            raise
        futures = self.batcher.submit(runner.name, [img.pixels for img in images], attention=attention,
                                      deadline=deadline)
        try:
            results = await asyncio.gather(*futures)
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; the batcher skips cancelled ones still queued
        self.metrics.observe_predictions(runner.name, (float(r.scores.max()) for r in results))
        if runner.detector is not None:
            self.metrics.observe_familiarity(runner.name, (r.familiar for r in results))
        return images, list(results)

    async def _decode_all(self, runner: ModelRunner, blobs: Sequence[bytes]) -> list[DecodedImage]:
        """Every image decoded, in order; the first failure (or a cancellation) stops the others' decoding."""
        share = self.decode_pool.share()
        tasks = [asyncio.ensure_future(self._decode(runner, share, blob)) for blob in blobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                    task.add_done_callback(_consume)

    async def _decode(self, runner: ModelRunner, share: Share, data: bytes) -> DecodedImage:
        """Read the header (cheap), then decode in the request's turn and memory budget."""
        pre = self.settings.max_image_pixels, runner.meta.preprocessing
        opened = await self.decode_pool.run(share, _probe, data, *pre)
        if opened.cost > share.budget:
            raise ImageTooLarge(f"decoding this {opened.width}x{opened.height} image would take about "
                                f"{opened.cost >> 20} MiB; the limit is {share.budget >> 20} MiB per request")
        decoded, seconds = await self.decode_pool.run(share, _timed_finish, opened, data, runner.meta.preprocessing,
                                                      self.keep_input, cost=opened.cost)
        self.metrics.observe_preprocess(runner.name, seconds)
        return decoded

    def _check_mask_budget(self, images: list[DecodedImage], modules: int) -> None:
        side = self.settings.max_mask_side
        pixels = sum(formatting.capped_size(img.width, img.height, side)[0] *
                     formatting.capped_size(img.width, img.height, side)[1] for img in images)
        total = pixels * modules
        if total > self.settings.max_mask_bytes:
            raise MasksTooLarge(f"attention_size=original would return {total >> 20} MiB of masks "
                                f"({modules} modules x {len(images)} images); the limit is "
                                f"{self.settings.max_mask_bytes >> 20} MiB: send fewer or smaller images, ask for "
                                "fewer modules, or use attention_size=feature")


def _probe(data: bytes, max_pixels: int, pre: Any) -> Any:
    return probe(data, max_pixels=max_pixels, pre=pre)


def _timed_finish(opened: Any, data: bytes, pre: Any, keep: Any = None) -> tuple[DecodedImage, float]:
    """Decode + preprocess one image on a pool thread (and make what the audit store keeps of it); the time
    excludes waiting for the thread."""
    start = time.perf_counter()
    decoded = finish(opened, data, pre, keep)
    return decoded, time.perf_counter() - start


async def _first_of(work: asyncio.Future, until_gone: Callable[[], Awaitable[Any]] | None) -> Any:
    """``work``'s result, or :class:`ClientGone` (``work`` cancelled) if ``until_gone`` returns first."""
    if until_gone is None:
        return await work
    watcher = asyncio.ensure_future(until_gone())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this coroutine is cancelled
        watcher.cancel()
        if not work.done():
            work.cancel()
            work.add_done_callback(_consume)
    if work not in done:
        raise ClientGone()
    return work.result()


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
