"""Serving compiled forms (``MACULA_COMPILE``): at start, load what the compile cache holds; then build what it lacks
in the background and swap each form in when it is ready.

``off`` serves eager. ``on`` and ``auto`` serve every form that builds, loads and matches eager. ``auto`` also times
the compiled forward against eager once per cache key (interleaved, at the batch cap, on the inference thread) and
keeps eager where compiling did not pay; the verdict is kept in the cache, so later starts do not time again.

A build runs as a child process at low priority (``nice``), ``python -m service.compile`` for one form of one model,
so the compiler neither holds this process's GIL nor takes CPU time that serving wants. Every step that runs the
model (the mask names, the comparison with eager, the timing, the swap itself) is a job on the inference thread,
between batches. Any failure to build, load or match leaves the model eager, with a log line and
``macula_compile_failures_total{model,stage}``; ``macula_model_compiled{model}`` says which form serves. Where
nothing can be built (no C++ compiler, a read-only cache) ``auto`` serves eager with an info line and no failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from . import compiled
from .compiled import FORMS, CompileCache, CompiledModel, CompileKey, compile_key
from .inference import ModelRunner
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("service.compile")

TIMING_ROUNDS = 3  # interleaved eager/compiled forwards per form, after one untimed each
BUILD_NICE = 10


class Stopped(Exception):
    """The service is stopping: abandon the compile work."""


class Compiler:
    """Gives each runner its compiled forms. :meth:`bind` once the runners and the inference thread exist,
    :meth:`load_cached` before warm-up (blocking), :meth:`start_background` once serving, :meth:`stop` at shutdown.

    ``command(runner, form)`` is the child process that builds one form (default: ``python -m service.compile``).
    Each form is compiled for its runner's batch cap and memory format (``runner.max_batch_size``, chosen before
    :meth:`load_cached`: service/tuning.py).
    """

    def __init__(self, settings: Settings, metrics: Metrics, *,
                 command: Callable[[ModelRunner, str], list[str]] | None = None) -> None:
        self.settings, self.mode = settings, settings.compile
        self.cache = CompileCache(settings.compile_cache_dir())
        self.metrics = metrics
        self.command = command or self.build_command
        self.runners: list[ModelRunner] = []
        self.call: Callable[..., Future] | None = None
        self.threads = 0
        self.pending: list[ModelRunner] = []  # runners with forms still to build
        self._stopping = threading.Event()
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def bind(self, runners: Sequence[ModelRunner], call: Callable[..., Future], threads: int) -> None:
        """``call(fn, *args)`` runs ``fn`` on the inference thread (the batcher's); ``threads`` is its torch threads."""
        self.runners, self.call, self.threads = list(runners), call, threads
        for runner in self.runners:
            self.metrics.model_compiled.labels(runner.name).set(0)

    # ------------------------------------------------------------------ lifecycle

    def load_cached(self) -> None:
        """Serve the cached forms of every model (blocking; run it in a thread, before warm-up)."""
        if self.mode == "off":
            return
        for runner in self.runners:
            try:
                if self._serve(runner, build=False):
                    self.pending.append(runner)
            except Stopped:
                return
            except Exception:  # never let the compiled form keep the service from starting
                log.exception("%s: loading the compiled form failed; it serves eager", runner.name)
                self.metrics.compile_failures_total.labels(runner.name, "load").inc()

    def start_background(self) -> None:
        """Build the missing forms, one at a time, and swap each in when it is ready."""
        if self.pending and self._thread is None:
            self._thread = threading.Thread(target=self._build_pending, name="macula-compile", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abandon the background work (blocking): a running build is killed."""
        self._stopping.set()
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                self._child.kill()
        if self._thread is not None:
            self._thread.join(timeout)

    def _build_pending(self) -> None:
        for runner in self.pending:
            try:
                self._serve(runner, build=True)
            except Stopped:
                return
            except Exception:  # never let the background thread die silently
                log.exception("compiling %s failed; it serves eager", runner.name)
                self.metrics.compile_failures_total.labels(runner.name, "compile").inc()

    # ------------------------------------------------------------------ one model

    def _serve(self, runner: ModelRunner, *, build: bool) -> bool:
        """Bring ``runner``'s forms in, in order; with ``build`` build missing ones. True if one is still to build."""
        key = compile_key(runner, runner.max_batch_size, self.threads)
        decision = self.cache.read_decision(key) if self.mode == "auto" else None
        if decision is not None and not decision["pays"]:
            self._report(runner, key, decision)
            return False
        for form in FORMS if runner.has_attention else FORMS[:1]:
            if runner.compiled is not None and form in runner.compiled.forms:
                continue
            marker = self.cache.failure(key, form)
            if marker.exists():
                log.warning("%s: the %s form failed before (%s: %s); serving it eager; delete that file to retry",
                            runner.name, form, marker, _first_line(marker))
                return False
            path = self.cache.package(key, form)
            if not path.exists():
                if not build:
                    return True
                if not self._build(runner, form):
                    return False
            if not self._adopt(runner, key, form, path):
                return not build and not path.exists()  # a package set aside as unloadable: rebuild it
        return False

    def _build(self, runner: ModelRunner, form: str) -> bool:
        missing = self._cannot_build()
        if missing:
            if self.mode == "auto":  # not a failure: compiling does not apply here
                log.info("%s: serving eager: %s (MACULA_COMPILE=off silences this)", runner.name, missing)
                return False
            return self._fail(runner, "compile", missing)
        log.info("%s: compiling the %s form in the background (serving %s meanwhile)", runner.name, form,
                 runner.serving_form)
        with self._lock:
            if self._stopping.is_set():
                raise Stopped
            self._child = subprocess.Popen(self.command(runner, form), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
        output, _ = self._child.communicate()
        if self._stopping.is_set():
            raise Stopped
        if self._child.returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-5:])
            return self._fail(runner, "compile", f"the build exited {self._child.returncode}:\n{tail}")
        return True

    def _cannot_build(self) -> str | None:
        """Why no form can be built here (no C++ compiler, a read-only cache), or None."""
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            return (f"no C++ compiler ({cxx}) to build the compiled form: install g++ (or set CXX), or build the "
                    "cache with python -m service.compile where one is")
        try:
            self.cache.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"the compile cache {self.cache.root} cannot be created ({exc}); set MACULA_COMPILE_CACHE"
        if not os.access(self.cache.root, os.W_OK):
            return f"the compile cache {self.cache.root} is not writable; set MACULA_COMPILE_CACHE"
        return None

    def _adopt(self, runner: ModelRunner, key: CompileKey, form: str, path: Any) -> bool:
        """Load ``form``, check it against eager, (auto) check that it pays, swap it in."""
        try:
            package = compiled.load_package(path, runner.device)
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: set aside, rebuilt next time
            self.cache.quarantine(path)
            return self._fail(runner, "load", f"{path}: {type(exc).__name__}: {exc}")
        names = [] if runner.compiled else self._on_inference(compiled.attention_names, runner)
        base = runner.compiled or CompiledModel(runner.model, names)
        candidate = base.with_form(form, package)
        try:
            problem = self._on_inference(compiled.mismatch, runner, candidate, form, (1, runner.max_batch_size))
        except Stopped:
            raise
        except Exception as exc:  # noqa: BLE001
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            self.cache.write_atomic(self.cache.failure(key, form), f"does not match eager: {problem}\n")
            return self._fail(runner, "verify", f"the {form} form does not match eager: {problem}")
        if form == "forward" and self.mode == "auto" and not self._pays(runner, key, candidate):
            return False
        self._on_inference(setattr, runner, "compiled", candidate)
        self.metrics.model_compiled.labels(runner.name).set(1 if runner.serving_form == "compiled" else 0)
        log.info("%s: serving the compiled %s form (%s)", runner.name, form, path)
        return True

    def _pays(self, runner: ModelRunner, key: CompileKey, candidate: CompiledModel) -> bool:
        decision = self.cache.read_decision(key)
        if decision is None:
            decision = self._measure(runner, candidate)
            self.cache.write_atomic(self.cache.decision(key), json.dumps(decision, indent=1) + "\n")
        return self._report(runner, key, decision)

    def _report(self, runner: ModelRunner, key: CompileKey, decision: dict[str, Any]) -> bool:
        speedup = decision["eager_s"] / max(decision["compiled_s"], 1e-9)
        self.metrics.compile_speedup_ratio.labels(runner.name).set(speedup)
        if not decision["pays"]:
            log.info("%s: the compiled forward did not pay here (%.1f ms vs %.1f ms eager at batch %d); serving "
                     "eager (MACULA_COMPILE=on forces it; delete %s to time again)", runner.name,
                     1000 * decision["compiled_s"], 1000 * decision["eager_s"], decision["batch"],
                     self.cache.decision(key))
        return bool(decision["pays"])

    def _measure(self, runner: ModelRunner, candidate: CompiledModel) -> dict[str, Any]:
        """Median forward time, eager and compiled interleaved, each run its own job between batches."""
        pixels = compiled.example_pixels(runner, runner.max_batch_size)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for round_ in range(TIMING_ROUNDS + 1):
            for name, model in (("eager", None), ("compiled", candidate)):
                seconds = self._on_inference(compiled.time_forward, runner, model, pixels)
                if round_:
                    times[name].append(seconds)
        eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
        return decide(eager_s, compiled_s, runner.max_batch_size)

    # ------------------------------------------------------------------ helpers

    def _on_inference(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the inference thread; :class:`Stopped` if the service stops meanwhile."""
        future = self.call(fn, *args)
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if self._stopping.is_set():
                    raise Stopped from None

    def _fail(self, runner: ModelRunner, stage: str, detail: str) -> bool:
        log.warning("%s: compiled form unavailable (%s), serving eager: %s", runner.name, stage, detail)
        self.metrics.compile_failures_total.labels(runner.name, stage).inc()
        return False

    def build_command(self, runner: ModelRunner, form: str) -> list[str]:
        """``python -m service.compile`` for one form of one model, with exactly this service's key settings (the
        runner's batch cap and memory format given, so the builder does not time them again)."""
        return [sys.executable, "-m", "service.compile", "--model-dir", str(runner.path.parent),
                "--models", runner.name, "--forms", form, "--cache", str(self.cache.root),
                "--device", str(runner.device), "--amp-dtype", self.settings.amp_dtype,
                "--max-batch-size", str(runner.max_batch_size), "--torch-threads", str(self.threads),
                "--nice", str(BUILD_NICE),
                "--channels-last" if runner.memory_format_name == "channels_last" else "--no-channels-last"]


def decide(eager_s: float, compiled_s: float, batch: int) -> dict[str, Any]:
    """The ``auto`` verdict: the compiled form pays when its median forward is no slower than eager's."""
    return {"pays": compiled_s <= eager_s, "eager_s": eager_s, "compiled_s": compiled_s, "batch": batch}


def _first_line(path: Any) -> str:
    try:
        return path.read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return "no detail"
