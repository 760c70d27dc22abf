"""The inference worker: a process of its own that loads the models and runs every forward in its main thread.

    python -m service.worker --socket-fd FD --parent-pid PID      (started by the server, never by hand)

Why a process (docs/benchmarks.md has the measurements): libgomp, torch's OpenMP runtime, keeps one thread team
per thread that ever ran a parallel op, and once the process holds more OpenMP threads than there are cores it
stops spinning between parallel regions, so in a server whose loader and inference threads both touched torch
every one of the hundreds of ops in a forward ends with its helper threads asleep and starts with a futex
wake-up. Here only the main thread ever runs torch (one team), and no other Python thread (event loop, decoders,
audit writer) competes with it for the GIL between ops.

It speaks :mod:`service.wire` on the socket the server passed: CONFIG in, STATUS while loading and warming up,
READY with the shared memory (sized for the largest of the models' batch caps), then RUN/RESULT (or FAILED) per
batch, and an EVENT whenever a compile metric changes. Each model's batch cap and memory format are chosen first
(:mod:`service.tuning`; a restarted worker is handed the first one's choices in its CONFIG and times nothing). The
compiled serving forms (``MACULA_COMPILE``, :mod:`service.compiling`) are this process's: it loads the cached ones
before warm-up and builds the missing ones in the background, and every step that runs a model (checks against
eager, timing, the swap) is a job its main thread runs between two batches.

It leaves with the server: on STOP, at the end of the stream (the server exited or was killed), and by
``PR_SET_PDEATHSIG`` where Linux offers it (even while it is busy loading). SIGINT and SIGTERM are ignored: a
Ctrl-C or a signal to the process group must not end it before the server has drained.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tuning, wire
from .compiled import CompileCache
from .compiling import Compiler
from .inference import ModelRunner
from .settings import Settings
from .wire import (
    FAILURE,
    RELAYED_METRICS,
    RESULT,
    RUN,
    Kind,
    Layout,
    ModelLayout,
    PeerGone,
    receive,
    receive_json,
    send,
    send_json,
)

log = logging.getLogger("service.worker")
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when the server dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the end of the stream still ends it
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        sys.exit(0)


def describe(runner: ModelRunner) -> dict:
    """What the server needs to know of a loaded model (JSON)."""
    meta = runner.meta
    return {"path": str(runner.path), "precision": runner.precision, "has_attention": runner.has_attention,
            "max_batch_size": runner.max_batch_size, "memory_format": runner.memory_format_name,
            "tuning": runner.tuning,
            "attention_modules": runner.attention_modules,
            "attention_sizes": {k: list(v) for k, v in runner.attention_sizes.items()},
            "meta": {"arch": meta.arch, "class_names": meta.class_names, "version": meta.version,
                     "preprocessing": asdict(meta.preprocessing), "training": meta.training, "extra": meta.extra,
                     "calibration": meta.calibration.to_json() if meta.calibration is not None else None}}


def layout_for(runners: dict[str, ModelRunner]) -> Layout:
    """Shared memory for a batch of any served model, up to the largest batch cap."""
    models = {name: ModelLayout(runner.input_shape, runner.meta.num_classes,
                                tuple((m, *runner.attention_sizes[m]) for m in runner.attention_modules))
              for name, runner in runners.items()}
    return Layout(max(runner.max_batch_size for runner in runners.values()), models)


class RelayedMetric:
    """One of the compile metrics, as :class:`~service.compiling.Compiler` uses it: ``labels(...).set/inc`` send
    an EVENT to the server, whose registry holds the real metric."""

    def __init__(self, name: str, emit: Callable[[dict], None], labels: tuple[str, ...] = ()) -> None:
        self.name, self.emit, self._labels = name, emit, labels

    def labels(self, *labels: str) -> RelayedMetric:
        return RelayedMetric(self.name, self.emit, labels)

    def set(self, value: float) -> None:
        self.emit({"metric": self.name, "labels": list(self._labels), "op": "set", "value": value})

    def inc(self, amount: float = 1.0) -> None:
        self.emit({"metric": self.name, "labels": list(self._labels), "op": "inc", "value": amount})


class RelayedMetrics:
    """The compile metrics of the worker's :class:`~service.compiling.Compiler`, relayed to the server."""

    def __init__(self, emit: Callable[[dict], None]) -> None:
        for name in RELAYED_METRICS:
            setattr(self, name, RelayedMetric(name, emit))


class Worker:
    def __init__(self, sock: socket.socket, settings: Settings, checkpoints: dict[str, str],
                 chosen: dict[str, dict] | None = None) -> None:
        self.sock, self.settings = sock, settings
        self.device = settings.resolved_device()
        self.checkpoints = checkpoints
        self.chosen = chosen or {}  # model -> the batch cap and memory format an earlier worker chose (describe())
        self.runners: dict[str, ModelRunner] = {}
        self.compiler = Compiler(settings, RelayedMetrics(self.emit))
        self._send_lock = threading.Lock()  # the main thread and the compiler's thread both send
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (future, fn, args) for the main thread
        self._wake_read, self._wake_write = os.pipe()

    def send(self, kind: Kind, body: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        with self._send_lock:
            send(self.sock, kind, body, fds)

    def send_json(self, kind: Kind, value: Any, fds: tuple[int, ...] = ()) -> None:
        with self._send_lock:
            send_json(self.sock, kind, value, fds)

    def emit(self, event: dict) -> None:
        self.send_json(Kind.EVENT, event)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """``fn(*args)`` on the main thread, between two batches (at once when called there)."""
        future: Future = Future()
        if threading.current_thread() is threading.main_thread():
            _run_into(future, fn, args)
        else:
            self._jobs.put((future, fn, args))
            os.write(self._wake_write, b"!")
        return future

    def load(self) -> None:
        """Load every model, choose its batch cap and memory format, serve its cached compiled forms and warm it
        up, in this (the main) thread."""
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        plan = tuning.plan_for(self.settings, self.device)
        for name, path in self.checkpoints.items():
            self.send_json(Kind.STATUS, {"state": "loading", "model": name})
            self.runners[name] = ModelRunner(name, Path(path), device=self.device,
                                             amp_dtype=self.settings.amp_dtype,
                                             channels_last=plan.formats[0] == "channels_last",
                                             max_batch_size=plan.first_batch_size)
        self.choose(plan)
        self.compiler.bind(list(self.runners.values()), self.call, torch.get_num_threads())
        self.compiler.load_cached()
        for name, runner in self.runners.items():
            self.send_json(Kind.STATUS, {"state": "warming up", "model": name})
            runner.warm_up(runner.max_batch_size)

    def choose(self, plan: tuning.Plan) -> None:
        """Each model's batch cap and memory format: as an earlier worker chose them, else by :func:`tuning.tune`."""
        cache = CompileCache(self.settings.compile_cache_dir())
        for name, runner in self.runners.items():
            earlier = self.chosen.get(name)
            if earlier is not None:
                tuning.apply(runner, int(earlier["max_batch_size"]), earlier["memory_format"], earlier["tuning"])
                continue
            if plan.timed:
                self.send_json(Kind.STATUS, {"state": "warming up", "model": name,
                                             "detail": "timing batch sizes and memory formats"})
            tuning.tune(runner, plan, cache)

    def serve(self) -> None:
        """Announce the models and the shared memory, then run batches until STOP or the end of the stream."""
        self.layout = layout_for(self.runners)
        fd, self.buffer = wire.shared_memory(self.layout.size)
        self.names = list(self.runners)
        ready = {"pid": os.getpid(), "layout": self.layout.to_json(),
                 "models": {name: describe(runner) for name, runner in self.runners.items()}}
        self.send_json(Kind.READY, ready, fds=(fd,))
        os.close(fd)  # the mapping keeps the memory; the server holds its own descriptor now
        self.compiler.start_background()
        while True:
            self._run_jobs()
            readable, _, _ = select.select([self.sock, self._wake_read], [], [])
            if self._wake_read in readable:
                os.read(self._wake_read, 4096)
            if self.sock not in readable:
                continue
            kind, body, _ = receive(self.sock)
            if kind is Kind.STOP:
                return
            if kind is not Kind.RUN:
                raise ValueError(f"unexpected message {kind.name} while serving")
            self.run(*RUN.unpack(body))

    def _run_jobs(self) -> None:
        while True:
            try:
                future, fn, args = self._jobs.get_nowait()
            except queue.Empty:
                return
            _run_into(future, fn, args)

    def close(self) -> None:
        """Abandon the compile work (a running build is killed)."""
        self.compiler.stop()

    def run(self, index: int, n: int, attention: int) -> None:
        name = self.names[index]
        start = time.perf_counter_ns()
        try:
            results = self.runners[name].run(self.layout.inputs(self.buffer, name, n), bool(attention))
        except Exception as exc:  # noqa: BLE001 - reported to the server, whose batcher splits the batch
            oom = isinstance(exc, torch.OutOfMemoryError)
            self.send(Kind.FAILED, FAILURE.pack(oom) + repr(exc)[:4000].encode(errors="replace"))
            return
        elapsed = time.perf_counter_ns() - start
        scores, familiarity = self.layout.scores(self.buffer, name, n), self.layout.familiarity(self.buffer, name, n)
        masks = self.layout.masks(self.buffer, name, n) if attention else {}
        for i, result in enumerate(results):
            scores[i] = result.scores
            familiarity[i] = (np.nan, np.nan) if result.familiar is None else (result.familiar, result.familiarity)
            for module, out in masks.items():
                out[i] = result.masks[module]
        self.send(Kind.RESULT, RESULT.pack(n, elapsed, *self._cuda_memory()))

    def _cuda_memory(self) -> tuple[int, int]:
        if not self.device.startswith("cuda"):
            return 0, 0
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)


def _run_into(future: Future, fn: Callable[..., Any], args: tuple) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
        future.set_exception(exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    os.set_inheritable(args.socket_fd, False)  # nothing this process starts may keep the server's socket open
    sock = socket.socket(fileno=args.socket_fd)
    try:
        kind, body, _ = receive(sock)
        if kind is not Kind.CONFIG:
            raise ValueError(f"expected CONFIG, got {kind.name}")
        config = receive_json(body)
        settings = Settings(**config["settings"])
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        worker = Worker(sock, settings, config["checkpoints"], config.get("chosen"))
        try:
            worker.load()
        except Exception as exc:  # noqa: BLE001 - the server reports it and stops starting
            worker.send_json(Kind.START_FAILED, {"type": type(exc).__name__, "message": str(exc)})
            raise SystemExit(1) from None
        try:
            worker.serve()
        finally:
            worker.close()
    except PeerGone:
        pass  # the server is gone: so are we


if __name__ == "__main__":
    main()
