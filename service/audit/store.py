"""The audit store: records queued from the request path, group-committed by one writer thread to a backend.

* **Best-effort** (default): :meth:`AuditStore.submit` never blocks and never raises; the response goes out
  before the record is written. A full queue or a failed commit drops records and counts them by reason.
* **Durable**: :meth:`AuditStore.commit` returns a future that completes once the record is committed, or
  fails with :class:`StoreUnavailable` (the caller answers 503). While the store is known to be down, commits
  fail at once instead of waiting.
* **Group commit**: the writer takes every record waiting at that moment (up to ``MAX_GROUP``) and writes them
  in one transaction, so concurrent durable requests share one commit.
* **Faults**: after a failed commit the writer waits (0.1 s, doubling to 2 s) before trying again, probing the
  database when idle; the first success counts as a reconnect. Records that were submitted but not yet
  written stay readable through :meth:`get`.
* **Retention** runs in its own thread (:mod:`service.audit.retention`), never on the writer's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .backends import open_backend
from .interface import (
    Backend,
    InvalidQuery,
    KeptInput,
    Page,
    RecordRejected,
    RetentionPolicy,
    RetentionResult,
    StoreUnavailable,
    Summary,
)
from .metrics import AuditMetrics
from .query import DEFAULT_LIMIT, Filters
from .records import EncodedRecord, encode, mask_png
from .retention import RetentionWorker

logger = logging.getLogger(__name__)

MAX_GROUP = 1000
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 2.0
LOG_EVERY_S = 60.0
_STOP = object()
Callback = Callable[[int], Any]


@dataclass(eq=False)
class _Item:
    record: Any
    inputs: Sequence[KeptInput | None] = ()
    future: concurrent.futures.Future | None = None
    encoded: EncodedRecord | None = field(default=None, repr=False)


class AuditStore:
    """See the module docstring. ``backend=None`` gives a disabled store (submit is a no-op, get finds nothing).

    ``on_write(n)`` / ``on_failure(n)`` are called with record counts (a Prometheus ``Counter.inc`` fits);
    ``clock`` gives the time for records without ``created_at`` and for age retention.
    """

    def __init__(self, backend: Backend | str | None, *, durable: bool = False,
                 retention: RetentionPolicy | None = None, max_records: int | None = 100_000,
                 max_age_s: float | None = 30 * 86400.0, max_bytes: int | None = None,
                 retention_interval_s: float = 60.0, queue_size: int = 10_000, commit_timeout_s: float = 10.0,
                 metrics: AuditMetrics | None = None, on_write: Callback | None = None,
                 on_failure: Callback | None = None, clock: Callable[[], float] = time.time) -> None:
        if retention is None:   # the limits may come one by one (as before there were policies)
            retention = RetentionPolicy(max_age_s=max_age_s, max_records=max_records, max_bytes=max_bytes)
        self.backend = open_backend(backend, durable=durable) if isinstance(backend, str) else backend
        self.durable = durable
        self.commit_timeout_s = commit_timeout_s
        self.metrics = metrics
        self._on_write, self._on_failure, self._clock = on_write, on_failure, clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._pending: dict[str, _Item] = {}
        self._lock = threading.Lock()            # guards _pending, the counters and _closed
        self._done = threading.Condition(self._lock)
        self._submitted = self._finished = 0
        self._closed = False
        self._healthy = True
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_log = -LOG_EVERY_S
        self._thread: threading.Thread | None = None
        self._retention = None if self.backend is None else RetentionWorker(
            self.backend, retention, interval_s=retention_interval_s, clock=clock, metrics=metrics)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def healthy(self) -> bool:
        """False from a failed commit until the database answers again."""
        return self._healthy

    # ------------------------------------------------------------------ request side

    def submit(self, record: dict[str, Any], inputs: Sequence[KeptInput | None] = ()) -> None:
        """Best-effort: queue a record. Never blocks, never raises; a dropped record is counted."""
        if self.enabled:
            self._enqueue(_Item(record, tuple(inputs)))

    def commit(self, record: dict[str, Any], inputs: Sequence[KeptInput | None] = ()) -> concurrent.futures.Future:
        """Durable: a future that completes once the record is committed, or fails with StoreUnavailable."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.enabled:
            future.set_result(None)
        elif not self._healthy:
            self._dropped("refused", 1)
            future.set_exception(StoreUnavailable("the audit store is unavailable (reconnecting)"))
        else:
            self._enqueue(_Item(record, tuple(inputs), future))
        return future

    async def save(self, record: dict[str, Any], inputs: Sequence[KeptInput | None] = ()) -> None:
        """From the event loop: :meth:`commit` and wait (durable store), else :meth:`submit`. Raises
        StoreUnavailable when a durable store cannot commit within ``commit_timeout_s``."""
        if not self.durable:
            self.submit(record, inputs)
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.commit(record, inputs)), self.commit_timeout_s)
        except TimeoutError:
            raise StoreUnavailable(f"the audit record was not committed within {self.commit_timeout_s:g} s") from None

    def _enqueue(self, item: _Item) -> None:
        reason = None
        with self._lock:
            if self._closed:
                reason = "closed"
            else:
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    reason = "queue_full"
                else:
                    self._submitted += 1
                    key = item.record.get("id") if isinstance(item.record, dict) else None
                    if isinstance(key, str):
                        self._pending[key] = item
        if reason is None:
            self._set_queue_depth()
            return
        self._dropped("refused" if item.future is not None else reason, 1)
        if item.future is not None:
            item.future.set_exception(StoreUnavailable(f"the audit store cannot take the record ({reason})"))

    # ------------------------------------------------------------------ reads

    def get(self, prediction_id: str) -> dict[str, Any] | None:
        """The record of one prediction, or None. Blocking (run it in a thread); raises StoreUnavailable."""
        if not self.enabled:
            return None
        with self._lock:
            item = self._pending.get(prediction_id)
        if item is not None:   # submitted, not written yet: answer with what will be stored
            try:
                return _copy(item.record)
            except (TypeError, ValueError):
                return None
        return self.backend.get(prediction_id)

    def kept_input(self, prediction_id: str, n: int) -> KeptInput | None:
        """The kept input of image ``n`` of a prediction (thumbnail or original), or None."""
        if not self.enabled:
            return None
        with self._lock:
            item = self._pending.get(prediction_id)
        if item is not None:
            return item.inputs[n] if 0 <= n < len(item.inputs) else None
        return self.backend.kept_input(prediction_id, n)

    def mask(self, prediction_id: str, n: int, module: str, *, size: str = "feature") -> bytes | None:
        """The PNG of one attention module's spatial mask for image ``n`` (``size="original"``: the copy resized to
        the input, where the prediction asked for one), or None. Blocking; raises StoreUnavailable."""
        record = self.get(prediction_id)
        return None if record is None else mask_png(record, n, module, size=size)

    def search(self, filters: Filters, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
        if not self.enabled:
            if cursor is not None:
                raise InvalidQuery("cursor is not one this service gave out (pass next_cursor back unchanged)")
            return Page([], None)
        return self.backend.search(filters, limit=limit, cursor=cursor)

    def export(self, filters: Filters) -> Iterator[Summary]:
        return iter(()) if not self.enabled else self.backend.export(filters)

    def apply_retention(self) -> RetentionResult:
        """One retention pass now, on the calling thread (the background thread does this every interval)."""
        return RetentionResult() if self._retention is None else self._retention.run_once()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the database (a failure is logged; the writer keeps trying) and start the writer and retention."""
        if not self.enabled or self._thread is not None:
            return
        try:
            self.backend.open()
        except StoreUnavailable as exc:
            self._mark_down(exc)
        self._thread = threading.Thread(target=self._run, name="macula-audit-writer", daemon=True)
        self._thread.start()
        self._retention.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is written (or dropped). True if it got there in time."""
        with self._done:
            target = self._submitted
            return self._done.wait_for(lambda: self._finished >= target, timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop taking records, write what is queued, stop the threads. True if it drained in time."""
        if not self.enabled:
            return True
        with self._lock:
            already_closed, self._closed = self._closed, True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="macula-audit-writer", daemon=True)
            self._thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not already_closed:
            self._retention.stop()
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return False
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        drained = not self._thread.is_alive()
        if drained and not already_closed:
            self.backend.close()
        return drained

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = self._take_group()
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                self._write(batch)
            elif not self._healthy and not stopping:
                self._probe()
            self._set_queue_depth()

    def _take_group(self) -> list[Any]:
        """Every item waiting now (at least one, or none after a probe interval while the store is down)."""
        if not self._healthy:
            wait = max(0.0, self._retry_at - time.monotonic())
            try:
                first = self._queue.get(timeout=max(wait, 0.01))
            except queue.Empty:
                return []
            if first is not _STOP:   # hold on until the backoff is over, then try with whatever has arrived
                time.sleep(max(0.0, self._retry_at - time.monotonic()))
        else:
            first = self._queue.get()
        group = [first]
        while len(group) < MAX_GROUP:
            try:
                group.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return group

    def _write(self, batch: list[_Item]) -> None:
        now = self._clock()
        rows, bad = [], []
        for item in batch:
            try:
                item.encoded = encode(item.record, item.inputs, now)
                rows.append(item)
            except (TypeError, ValueError, AttributeError) as exc:
                bad.append(item)
                self._log(f"audit record not storable: {exc}")
        if bad:
            self._fail(bad, "invalid", StoreUnavailable("the audit record could not be encoded"))
        try:
            if rows:
                self._commit(rows)
        except RecordRejected:
            for item in rows:    # find the rows the database refuses; write the others
                try:
                    self._commit([item])
                except RecordRejected as exc:
                    self._log(f"audit record refused by the database: {exc}")
                    self._fail([item], "invalid", StoreUnavailable("the audit record was refused"))
                except StoreUnavailable as exc:
                    self._mark_down(exc)
                    self._fail([item], "store_unavailable", exc)
        except StoreUnavailable as exc:
            self._mark_down(exc)
            self._fail(rows, "store_unavailable", exc)
        except Exception as exc:   # a bug here must not kill the writer and strand flush()/close()
            logger.exception("audit writer failed")
            self._fail(rows, "error", StoreUnavailable(f"audit writer failed: {exc!r}"))
        finally:
            self._finish(batch)

    def _commit(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        self.backend.write([item.encoded for item in items])
        if self.metrics is not None:
            self.metrics.observe_commit(time.perf_counter() - started, len(items))
        self._mark_up()
        for item in items:
            _resolve(item.future, None)
        _notify(self._on_write, len(items))

    def _probe(self) -> None:
        try:
            self.backend.ping()
        except StoreUnavailable as exc:
            self._mark_down(exc)
        except Exception:
            logger.exception("audit store probe failed")
            self._mark_down(StoreUnavailable("probe failed"))
        else:
            self._mark_up()

    # ------------------------------------------------------------------ health and bookkeeping

    def _mark_down(self, exc: BaseException) -> None:
        was_healthy, self._healthy = self._healthy, False
        self._backoff = FIRST_BACKOFF_S if was_healthy else min(MAX_BACKOFF_S, max(self._backoff, 0.05) * 2)
        self._retry_at = time.monotonic() + self._backoff
        if self.metrics is not None:
            self.metrics.up.set(0)
        if was_healthy:
            logger.warning("audit store unavailable, retrying every %.1f-%.0f s: %s", FIRST_BACKOFF_S,
                           MAX_BACKOFF_S, exc)
            self._last_log = time.monotonic()
        else:
            self._log(f"audit store still unavailable: {exc}")

    def _mark_up(self) -> None:
        if self.metrics is not None:
            self.metrics.up.set(1)
        if not self._healthy:
            self._healthy = True
            logger.warning("audit store is back")
            if self.metrics is not None:
                self.metrics.reconnects_total.inc()

    def _fail(self, items: list[_Item], reason: str, exc: StoreUnavailable) -> None:
        durable = [item for item in items if item.future is not None]
        if durable:
            self._dropped("refused", len(durable))
        if len(items) > len(durable):
            self._dropped(reason, len(items) - len(durable))
        for item in durable:
            _resolve(item.future, exc)

    def _dropped(self, reason: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.dropped(reason, count)
        _notify(self._on_failure, count)

    def _finish(self, batch: list[_Item]) -> None:
        with self._done:
            for item in batch:
                key = item.record.get("id") if isinstance(item.record, dict) else None
                if isinstance(key, str) and self._pending.get(key) is item:
                    del self._pending[key]
            self._finished += len(batch)
            self._done.notify_all()

    def _set_queue_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            logger.warning("%s (further audit warnings suppressed for %.0f s)", message, LOG_EVERY_S)


def _copy(record: Any) -> Any:
    import json

    return json.loads(json.dumps(record))


def _resolve(future: concurrent.futures.Future | None, exc: BaseException | None) -> None:
    if future is None or future.done():
        return
    try:
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
    except concurrent.futures.InvalidStateError:   # cancelled meanwhile (the request timed out or went away)
        pass


def _notify(callback: Callback | None, count: int) -> None:
    if callback is None:
        return
    try:
        callback(count)
    except Exception:   # a broken callback must not break the writer or the request path
        logger.exception("audit callback failed")
