"""The drain on SIGTERM: stop taking new work at once, let accepted requests finish, and answer those still
unfinished shortly before the drain timeout (503 ``not_ready``) so that none is cut off without an answer.

"Accepted" means the request had reached the server before the drain began (:meth:`Drain.arrival`), not that its
route had run yet: on a busy machine a request can wait a while between the two, and uvicorn, like any graceful
server, finishes the requests it had begun."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

# Whether the request this task serves reached the server before the drain began; False outside any arrival.
_arrived_before_drain: ContextVar[bool] = ContextVar("arrived_before_drain", default=False)


class Drain:
    """``begin()`` starts it (from any thread); ``expired`` turns True ``timeout_s`` minus a margin later, and every
    :meth:`deadline` future resolves then."""

    def __init__(self, timeout_s: float, on_begin: Callable[[], None]) -> None:
        self.timeout_s, self._on_begin = timeout_s, on_begin
        self.draining = False
        self.expired = False  # True shortly before the drain timeout: answer everything now
        self._waiters: set[asyncio.Future] = set()
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's: where the expiry is timed

    def begin(self) -> None:
        if self.draining:
            return
        self.draining = True
        self._on_begin()
        answer_by = max(0.0, self.timeout_s - min(1.0, self.timeout_s / 4))  # time left to send those answers
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.call_later, answer_by, self._expire)

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Stamp the work started inside it (the tasks created here copy the stamp) as arrived before the drain, or
        during it."""
        token = _arrived_before_drain.set(not self.draining)
        try:
            yield
        finally:
            _arrived_before_drain.reset(token)

    def admits(self) -> bool:
        """Whether the current request may start: not draining, or it arrived before the drain began."""
        return not self.draining or _arrived_before_drain.get()

    def _expire(self) -> None:
        self.expired = True
        for waiter in list(self._waiters):
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits there any more
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    @contextlib.contextmanager
    def deadline(self) -> Iterator[asyncio.Future]:
        """A future on the running loop that resolves when the drain runs out (at once if it has)."""
        waiter = asyncio.get_running_loop().create_future()
        if self.expired:
            waiter.set_result(None)
        self._waiters.add(waiter)
        try:
            yield waiter
        finally:
            self._waiters.discard(waiter)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
