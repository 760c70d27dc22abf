"""service/drain.py: the drain starts once, runs out shortly before its timeout, and wakes every waiter then."""

from __future__ import annotations

import asyncio

from service.drain import Drain


def test_begin_once_expire_before_the_timeout_and_wake_the_waiters() -> None:
    async def scenario() -> None:
        begun: list[bool] = []
        drain = Drain(0.4, on_begin=lambda: begun.append(True))
        drain.loop = asyncio.get_running_loop()
        with drain.deadline() as waiter:
            drain.begin()
            drain.begin()
            assert drain.draining and begun == [True] and not drain.expired
            await asyncio.wait_for(waiter, 5)  # at 0.4 - min(1, 0.4 / 4) = 0.3 s
            assert drain.expired
        with drain.deadline() as late:  # after the expiry: resolved at once
            assert late.done()

    asyncio.run(scenario())


def test_a_drain_without_a_loop_only_stops_taking_work() -> None:
    drain = Drain(10, on_begin=lambda: None)
    drain.begin()
    assert drain.draining and not drain.expired


def test_work_that_arrived_before_the_drain_is_admitted_after_it_began() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        drain = Drain(10, on_begin=lambda: None)
        started = asyncio.Event()

        async def route() -> bool:  # runs after the signal, in the task created at arrival
            await started.wait()
            return drain.admits()

        with drain.arrival():
            early = asyncio.ensure_future(route())
        drain.begin()
        with drain.arrival():
            late = asyncio.ensure_future(route())
        started.set()
        return await early, await late, drain.admits()  # the last: outside any arrival

    assert asyncio.run(scenario()) == (True, False, False)


def test_everything_is_admitted_before_a_drain() -> None:
    assert Drain(10, on_begin=lambda: None).admits()
