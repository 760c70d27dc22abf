"""The drain on SIGTERM: stop taking new work at once, let accepted requests finish, and answer those still
unfinished shortly before the drain timeout (503 ``not_ready``) so that none is cut off without an answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator


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
