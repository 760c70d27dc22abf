"""The server's side of the inference worker (service/worker.py): start it, feed it batches, restart it if it dies.

:class:`InferenceProcess` is what the batcher's inference thread calls instead of running torch itself: ``run``
writes the batch's pixels into shared memory, sends one fixed-format RUN record and blocks (GIL released) until
the worker's RESULT, then copies the scores and masks out. A failure the worker reports for a batch (a poisoned
image, CUDA out of memory) comes back as an exception, so the batcher's one split-and-retry mechanism handles it
as before. If the worker itself is gone (crashed, killed, out of host memory) the batch, and every batch until
it is back, gets :class:`InferenceUnavailable` (JSON 503 ``not_ready``, never split), readiness turns 503, and a
supervisor thread starts a new worker (at once; with a growing pause, up to 30 s, while it keeps dying young).

:class:`RemoteModel` stands for a model the worker loaded: the attributes of a ``ModelRunner`` the service reads
(``meta``, ``precision``, ``attention_modules``, ...), as the worker reported them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models import CheckpointError, CheckpointMetadata, Preprocessing
from models.familiarity import Calibration, Detector

from .batching import Unavailable
from .inference import ImageResult
from .settings import Settings
from .wire import FAILURE, RELAYED_METRICS, RESULT, RUN, Kind, Layout, PeerGone, receive, receive_json, send, send_json

log = logging.getLogger("service.inference_process")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
POLL_S = 1.0  # how often a blocked read checks that the worker is still alive
YOUNG_S = 30.0  # a worker that dies younger than this makes the next restart wait (1, 2, 4 ... 30 s)
SECRET_SETTINGS = {"api_key", "audit_url"}  # never handed to the worker (it does not need them)


class InferenceUnavailable(Unavailable):
    """The inference worker is not running (starting, restarting or stopped)."""


class WorkerStartFailed(RuntimeError):
    """The worker could not load or warm up the models."""


class WorkerFailure(RuntimeError):
    """The worker reported that this batch failed (the worker itself goes on)."""


class WorkerOutOfMemory(WorkerFailure):
    """The worker ran out of (CUDA) memory on this batch; it freed its cache already."""


@dataclass
class RemoteModel:
    """A model loaded by the worker: what the service reads of a ``ModelRunner``, and :meth:`run`."""

    name: str
    path: Path
    meta: CheckpointMetadata
    precision: str
    has_attention: bool
    attention_modules: list[str]
    attention_sizes: dict[str, tuple[int, int]]
    max_batch_size: int  # the batch cap and memory format the worker chose (service/tuning.py), and how
    memory_format_name: str
    tuning: dict[str, str]
    process: InferenceProcess = field(repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        pre = self.meta.preprocessing
        return (*pre.input_size, 3 if pre.color == "RGB" else 1)

    @property
    def calibration(self) -> Calibration | None:
        return self.meta.calibration

    @property
    def detector(self) -> Detector | None:
        return self.calibration.detector if self.calibration is not None else None

    @property
    def serving_form(self) -> str:
        """``compiled`` once the worker serves the compiled forward (``macula_model_compiled``), else ``eager``."""
        return self.process.serving_forms.get(self.name, "eager")

    def run(self, inputs: np.ndarray, attention: bool = False) -> list[ImageResult]:
        return self.process.run(self.name, inputs, attention)

    def warm_up(self, max_batch_size: int) -> None:
        """Nothing to do: the worker warms every model up before it reports ready."""


def _remote_model(name: str, info: dict[str, Any], process: InferenceProcess) -> RemoteModel:
    m = info["meta"]
    calibration = Calibration.from_json(m["calibration"]) if m["calibration"] is not None else None
    meta = CheckpointMetadata(arch=m["arch"], class_names=m["class_names"],
                              preprocessing=Preprocessing.from_dict(m["preprocessing"]), version=m["version"],
                              training=m["training"], extra=m["extra"], calibration=calibration)
    return RemoteModel(name, Path(info["path"]), meta, info["precision"], info["has_attention"],
                       list(info["attention_modules"]), {k: tuple(v) for k, v in info["attention_sizes"].items()},
                       int(info["max_batch_size"]), str(info["memory_format"]),
                       {str(k): str(v) for k, v in info["tuning"].items()}, process)


def worker_environment(settings: Settings) -> dict[str, str]:
    """Environment defaults for the worker (the server's own environment wins over them).

    ``GOMP_SPINCOUNT`` (``omp_spin_count``): how long torch's OpenMP helper threads spin before they sleep after a
    parallel op. The gaps between the ops of an eager forward are ~10 µs typically, 99 % under ~0.2 ms: 10 000 spins
    keep the helpers awake through most of them, so a lone request's forward is not slowed by hundreds of futex
    wake-ups. libgomp's own default (300 000, ~3 ms) keeps them spinning long after every op, which on a machine
    with more busy threads than cores burns the core the other helper waits for; 0 sleeps at once (the right
    choice there). docs/benchmarks.md has the measurements."""
    if "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": str(settings.omp_spin_count)}


def _familiarity(flag: float, value: float) -> tuple[bool | None, float | None]:
    return (None, None) if math.isnan(flag) else (bool(flag), value)


class _Connection:
    """One running worker: its process, socket, shared memory and layout."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, on_event: Callable[[bytes], None]) -> None:
        self.proc, self.sock, self.on_event = proc, sock, on_event
        self.started = time.monotonic()
        self.buffer: mmap.mmap | None = None
        self.layout: Layout | None = None
        self.index: dict[str, int] = {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def receive(self, *, with_fds: bool = False) -> tuple[Kind, bytes, list[int]]:
        """The next message that is not an EVENT (those are applied on the way)."""
        while True:
            kind, body, fds = receive(self.sock, with_fds=with_fds, alive=self.alive)
            if kind is not Kind.EVENT:
                return kind, body, fds
            self.on_event(body)

    def receive_waiting_events(self) -> None:
        """Apply the EVENTs the worker sent while no batch ran (only call it with no batch in flight)."""
        while select.select([self.sock], [], [], 0)[0]:
            kind, body, _ = receive(self.sock, alive=self.alive)
            if kind is not Kind.EVENT:
                raise PeerGone(f"unexpected {kind.name} from the worker between batches")
            self.on_event(body)

    def attach(self, ready: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            raise WorkerStartFailed(f"the worker passed {len(fds)} descriptors with READY, expected 1")
        self.layout = Layout.from_json(ready["layout"])
        try:
            self.buffer = mmap.mmap(fds[0], self.layout.size)
        finally:
            os.close(fds[0])
        self.index = {name: i for i, name in enumerate(ready["models"])}

    def run(self, model: str, inputs: np.ndarray, attention: bool) -> tuple[list[ImageResult], tuple[int, int]]:
        n = len(inputs)
        try:
            self.layout.inputs(self.buffer, model, n)[...] = inputs
        except ValueError as exc:  # a batch that does not fit: nothing was sent, the worker is fine
            raise WorkerFailure(str(exc)) from None
        send(self.sock, Kind.RUN, RUN.pack(self.index[model], n, int(attention)))
        kind, body, _ = self.receive()
        if kind is Kind.FAILED:
            oom = FAILURE.unpack_from(body)[0]
            message = body[FAILURE.size:].decode(errors="replace")
            raise (WorkerOutOfMemory if oom else WorkerFailure)(f"in the inference worker: {message}")
        if kind is not Kind.RESULT:
            raise PeerGone(f"unexpected {kind.name} from the worker")
        count, _, allocated, reserved = RESULT.unpack(body)
        scores = self.layout.scores(self.buffer, model, n).copy()
        familiarity = self.layout.familiarity(self.buffer, model, n).tolist()
        masks = {k: v.copy() for k, v in self.layout.masks(self.buffer, model, n).items()} if attention else None
        results = [ImageResult(scores[i], {k: v[i] for k, v in masks.items()} if masks is not None else None,
                               *_familiarity(*familiarity[i])) for i in range(count)]
        return results, (allocated, reserved)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.buffer is not None:
            with contextlib.suppress(BufferError):  # a view still alive somewhere: the GC frees it later
                self.buffer.close()


class InferenceProcess:
    """The inference worker process and the thread that keeps it running."""

    def __init__(self, settings: Settings, checkpoints: dict[str, Path], *, metrics: Any = None,
                 on_change: Callable[[], None] | None = None, command: list[str] | None = None) -> None:
        self.settings, self.checkpoints, self.metrics = settings, checkpoints, metrics
        self.on_change = on_change or (lambda: None)
        self.command = command or [sys.executable, "-m", "service.worker"]
        self.models: dict[str, RemoteModel] = {}
        self.serving_forms: dict[str, str] = {}  # model -> "compiled" | "eager", from the worker's EVENTs
        self.state, self.reason = "starting", "starting the inference worker"
        self._conn: _Connection | None = None
        self._starting: subprocess.Popen | None = None
        self._lock = threading.Lock()  # held while a batch runs; the supervisor takes it to swap workers
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle (any thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="macula-worker-supervisor", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> dict[str, RemoteModel]:
        """Block until the first worker is ready (its models), or raise why it could not start."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.state != "starting", timeout):
                raise TimeoutError("the inference worker did not start in time")
        if self._start_error is not None:
            raise self._start_error
        return self.models

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def stop(self, timeout: float = 10.0) -> None:
        """Tell the worker to exit (after the batch it runs, if any), kill it if it does not; stop supervising."""
        self._stopping.set()
        with self._changed:
            starting = self._starting
        if starting is not None:
            starting.kill()
        if self._lock.acquire(timeout=timeout):  # not while a batch runs: the worker reads STOP after it
            try:
                if self._conn is not None:
                    with contextlib.suppress(OSError):
                        send(self._conn.sock, Kind.STOP)
            finally:
                self._lock.release()
        if self._thread is not None:
            self._thread.join(timeout)
        conn = self._conn
        if conn is not None and conn.alive():
            conn.proc.kill()
        if self._thread is not None:
            self._thread.join(5.0)
        self._set_state("stopped", "the inference worker was stopped")

    # ------------------------------------------------------------------ the batcher's inference thread

    def run(self, model: str, inputs: np.ndarray, attention: bool) -> list[ImageResult]:
        with self._lock:
            conn = self._conn
            if conn is None or self.state != "ready":
                raise InferenceUnavailable(f"the model cannot run now: {self.reason}")
            try:
                results, (allocated, reserved) = conn.run(model, inputs, attention)
            except WorkerFailure:
                raise  # this batch failed; the worker goes on
            except Exception as exc:  # it died, or the exchange broke: a new worker must take over
                if not isinstance(exc, (PeerGone, OSError)):
                    log.error("the exchange with the inference worker broke (%r); replacing it", exc)
                    conn.proc.kill()
                self._set_state("restarting", "the inference worker stopped; restarting it")
                raise InferenceUnavailable("the inference worker process stopped while running this batch; it "
                                           "is being restarted") from exc
        if (allocated or reserved) and self.metrics is not None:
            self.metrics.set_gpu_memory(self.settings.resolved_device(), allocated, reserved)
        return results

    # ------------------------------------------------------------------ the supervisor thread

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                conn = self._spawn()
            except (WorkerStartFailed, CheckpointError, OSError) as exc:
                if not self.models:  # the first start: the service cannot serve at all
                    self._start_error = exc
                    self._set_state("failed", f"the inference worker could not start: {exc}")
                    return
                failures += 1
                log.error("the inference worker could not restart: %s", exc)
                self._set_state("restarting", f"the inference worker could not restart: {exc}")
                self._stopping.wait(min(YOUNG_S, 2.0 ** (failures - 1)))
                continue
            with self._lock:
                self._conn = conn
            self._set_state("ready", "")
            code = self._wait_for_exit(conn)
            if not self._stopping.is_set():
                self._set_state("restarting", f"the inference worker exited (status {code}); restarting it")
            with self._lock:  # a batch in flight sees the end of its stream first
                self._conn = None
            conn.close()
            if self._stopping.is_set():
                return
            log.error("the inference worker (pid %d) exited with status %s; restarting it", conn.proc.pid, code)
            if self.metrics is not None:
                self.metrics.worker_restarted()
            failures = failures + 1 if time.monotonic() - conn.started < YOUNG_S else 0
            if failures:
                self._stopping.wait(min(YOUNG_S, 2.0 ** (failures - 1)))

    def _wait_for_exit(self, conn: _Connection) -> int:
        """Wait for the worker to exit; meanwhile apply the EVENTs it sends between batches."""
        while True:
            try:
                return conn.proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if not self._lock.acquire(blocking=False):  # a batch runs: its reader applies them
                continue
            try:
                conn.receive_waiting_events()
            except (PeerGone, OSError, ValueError) as exc:
                log.error("the exchange with the inference worker broke between batches (%r); replacing it", exc)
                conn.proc.kill()
            finally:
                self._lock.release()

    def _apply_event(self, body: bytes) -> None:
        """A compile metric the worker's Compiler changed (service/worker.py ``RelayedMetrics``)."""
        event = receive_json(body)
        name, labels, op, value = event["metric"], [str(x) for x in event["labels"]], event["op"], event["value"]
        if name not in RELAYED_METRICS or op not in ("set", "inc"):
            raise ValueError(f"unknown event {name}.{op} from the worker")
        if name == "model_compiled":
            self.serving_forms[labels[0]] = "compiled" if value else "eager"
        if self.metrics is not None:
            getattr(getattr(self.metrics, name).labels(*labels), op)(float(value))

    def _spawn(self) -> _Connection:
        """Start a worker and follow its start-up until READY (models loaded and warmed up)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [*self.command, "--socket-fd", str(theirs.fileno()), "--parent-pid", str(os.getpid())]
        env = {**worker_environment(self.settings), **os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        try:
            proc = subprocess.Popen(command, pass_fds=[theirs.fileno()], env=env)
        finally:
            theirs.close()
        with self._changed:
            self._starting = proc
        if self._stopping.is_set():
            proc.kill()
        self.serving_forms = {}  # a new worker starts eager
        conn = _Connection(proc, ours, self._apply_event)
        ours.settimeout(POLL_S)
        try:
            self._handshake(conn)
        except BaseException:
            proc.kill()
            proc.wait()
            conn.close()
            raise
        finally:
            with self._changed:
                self._starting = None
        return conn

    def _handshake(self, conn: _Connection) -> None:
        config = {"settings": self.settings.model_dump(mode="json", exclude=SECRET_SETTINGS),
                  "checkpoints": {name: str(path) for name, path in self.checkpoints.items()},
                  "chosen": self._chosen()}
        try:
            send_json(conn.sock, Kind.CONFIG, config)
            while True:
                kind, body, fds = conn.receive(with_fds=True)
                if kind is Kind.STATUS:
                    status = receive_json(body)
                    detail = f" ({status['detail']})" if status.get("detail") else ""
                    self._set_state(self.state, f"{status['state']}: model {status['model']!r}{detail}")
                elif kind is Kind.READY:
                    ready = receive_json(body)
                    conn.attach(ready, fds)
                    self.models = {name: _remote_model(name, info, self) for name, info in ready["models"].items()}
                    log.info("inference worker ready (pid %d)", ready["pid"])
                    return
                elif kind is Kind.START_FAILED:
                    failure = receive_json(body)
                    error = CheckpointError if failure["type"] == "CheckpointError" else WorkerStartFailed
                    raise error(failure["message"])
                else:
                    raise WorkerStartFailed(f"unexpected {kind.name} from the worker during start-up")
        except PeerGone:
            raise WorkerStartFailed(f"the worker exited during start-up (status {conn.proc.wait()})") from None

    def _chosen(self) -> dict[str, dict]:
        """The batch caps and memory formats the first worker chose: a restarted worker keeps them (the server's
        batcher and the shared memory were sized for them) and times nothing."""
        return {name: {"max_batch_size": m.max_batch_size, "memory_format": m.memory_format_name,
                       "tuning": m.tuning} for name, m in self.models.items()}

    def _set_state(self, state: str, reason: str) -> None:
        with self._changed:
            self.state, self.reason = state, reason
            self._changed.notify_all()
        self.on_change()
