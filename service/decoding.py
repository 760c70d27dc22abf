"""The decode pool: a few threads shared fairly between requests, each request within its memory budget.

Every request gets a :class:`Share`. Jobs wait in their share's queue; whenever a thread is free the pool runs the
next job of the share with the fewest jobs running, the one served longest ago first, so a request with 64 large
images cannot make a one-image request wait for more than the decodes already running. A share runs a job only
while the estimated bytes of its running jobs plus the job's own fit in its budget (one job always runs, so no
request stalls), which bounds the memory one request's decoding holds; the number of threads bounds it for the
whole process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    cost: int
    future: asyncio.Future
    started: bool = False


@dataclass(eq=False)
class Share:
    """One request's place in the pool: its waiting jobs and what its running jobs hold."""

    budget: int
    waiting: deque[_Job] = field(default_factory=deque)
    running: int = 0
    in_use: int = 0
    served: int = -1  # when it last started a job (the pool's dispatch count)

    def can_start(self, job: _Job) -> bool:
        return self.running == 0 or self.in_use + job.cost <= self.budget


class DecodePool:
    def __init__(self, workers: int, *, budget_bytes: int) -> None:
        self.workers, self.budget_bytes = workers, budget_bytes
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="macula-decode")
        self._free = workers
        self._dispatched = 0
        self._ready: list[Share] = []  # shares with waiting jobs

    def share(self) -> Share:
        return Share(self.budget_bytes)

    async def run(self, share: Share, fn: Callable[..., Any], *args: Any, cost: int = 0) -> Any:
        """``fn(*args)`` on a pool thread, in ``share``'s turn and budget. Cancelling the caller drops the job
        if it has not started (a started one runs to its end and then frees its thread and budget)."""
        job = _Job(fn, args, cost, asyncio.get_running_loop().create_future())
        share.waiting.append(job)
        if share not in self._ready:
            self._ready.append(share)
        self._dispatch()
        try:
            return await job.future
        finally:
            if not job.started:
                with contextlib.suppress(ValueError):
                    share.waiting.remove(job)
                if not share.waiting and share in self._ready:
                    self._ready.remove(share)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self) -> None:
        while self._free > 0:
            share = self._next_share()
            if share is None:
                return
            job = share.waiting.popleft()
            if not share.waiting:
                self._ready.remove(share)
            if job.future.done():  # its caller gave up while it waited
                continue
            job.started, share.running, share.in_use = True, share.running + 1, share.in_use + job.cost
            share.served, self._dispatched = self._dispatched, self._dispatched + 1
            self._free -= 1
            done = self._executor.submit(job.fn, *job.args)
            done.add_done_callback(lambda f, s=share, j=job: self._on_done(s, j, f))

    def _next_share(self) -> Share | None:
        """The share whose turn it is: fewest jobs running, then served longest ago, among those whose next job
        fits their budget now."""
        startable = [share for share in self._ready if share.waiting and share.can_start(share.waiting[0])]
        return min(startable, key=lambda share: (share.running, share.served), default=None)

    def _on_done(self, share: Share, job: _Job, done: Future) -> None:
        """On the pool thread: hand the outcome to the event loop (a closed loop: nobody is waiting any more)."""
        with contextlib.suppress(RuntimeError):
            job.future.get_loop().call_soon_threadsafe(self._finished, share, job, done)

    def _finished(self, share: Share, job: _Job, done: Future) -> None:
        self._free += 1
        share.running, share.in_use = share.running - 1, share.in_use - job.cost
        if not job.future.done():
            if done.cancelled():
                job.future.cancel()
            elif done.exception() is not None:
                job.future.set_exception(done.exception())
            else:
                job.future.set_result(done.result())
        self._dispatch()
