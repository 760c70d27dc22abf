"""Batch collection (a pure function) and the batcher's worker thread, without any server."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import numpy as np
import pytest

from service.batching import Batcher, DeadlineExceeded, InferenceFailed, Pending, QueueFull, collect_batch


def entry(arrival: float, deadline: float = 100.0, cancelled: bool = False) -> Pending:
    future: Future = Future()
    if cancelled:
        future.cancel()
    return Pending(inputs=None, future=future, arrival=arrival, deadline=deadline)


def test_idle_worker_runs_a_lone_request_at_once():
    queue = [entry(0.0)]
    out = collect_batch(queue, now=0.0001, max_size=8, max_delay=0.005, expecting=0)
    assert out.batch == queue and out.wait == 0 and not out.rest


def test_waits_for_images_being_decoded_but_only_until_delay_after_first_arrival():
    queue = [entry(1.000), entry(1.003)]
    early = collect_batch(queue, now=1.004, max_size=8, max_delay=0.005, expecting=3)
    assert early.batch == [] and early.rest == queue
    assert early.wait == pytest.approx(0.001)  # counted from the FIRST arrival (1.000 + 0.005), not the last
    late = collect_batch(queue, now=1.005, max_size=8, max_delay=0.005, expecting=3)
    assert late.batch == queue and late.wait == 0


def test_size_cap_takes_the_oldest_and_keeps_the_rest_in_order():
    queue = [entry(float(i)) for i in range(11)]
    out = collect_batch(queue, now=20.0, max_size=4, max_delay=0.0)
    assert out.batch == queue[:4] and out.rest == queue[4:]


def test_full_batch_does_not_wait_even_when_more_are_coming():
    queue = [entry(1.0) for _ in range(4)]
    out = collect_batch(queue, now=1.0, max_size=4, max_delay=10.0, expecting=50)
    assert out.batch == queue and out.wait == 0


def test_expired_entries_are_separated_and_never_batched():
    fresh, stale = entry(0.0, deadline=10.0), entry(0.0, deadline=1.0)
    out = collect_batch([stale, fresh], now=5.0, max_size=8, max_delay=0.0)
    assert out.expired == [stale] and out.batch == [fresh]


def test_cancelled_entries_are_skipped_and_do_not_count_towards_the_delay():
    gone, live = entry(0.0, cancelled=True), entry(0.9)
    out = collect_batch([gone, live], now=1.0, max_size=8, max_delay=0.5, expecting=2)
    assert out.cancelled == [gone] and out.batch == [] and out.wait == pytest.approx(0.4)


def test_empty_queue_gives_nothing_to_do():
    out = collect_batch([], now=0.0, max_size=8, max_delay=0.01, expecting=5)
    assert (out.batch, out.expired, out.cancelled, out.rest, out.wait) == ([], [], [], [], 0.0)


# ------------------------------------------------------------------------------------- the worker thread


class Recorder:
    """A fake model: returns each input's first value; raises for inputs equal to ``poison``."""

    def __init__(self, poison: float | None = None) -> None:
        self.batches: list[list[float]] = []
        self.poison = poison
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, model: str, inputs: np.ndarray, attention: bool) -> list[float]:
        self.gate.wait(10)
        values = [float(x[0]) for x in inputs]
        self.batches.append(values)
        if self.poison in values:
            raise ValueError("poisoned input")
        return values


async def _queue_and_run(batcher: Batcher, recorder: Recorder, values: list[float]) -> list:
    recorder.gate.clear()
    blocker = batcher.call(recorder.gate.wait, 10)  # the worker is busy: everything below queues up
    futures = []
    for v in values:
        batcher.reserve("m", 1)
        futures += batcher.submit("m", [np.array([v], np.float32)], attention=False)
    recorder.gate.set()
    await asyncio.wrap_future(blocker)
    return await asyncio.gather(*futures, return_exceptions=True)


def test_poisoned_member_fails_alone_and_the_worker_lives_on():
    recorder = Recorder(poison=3.0)
    batcher = Batcher(recorder, ["m"], max_size=8, max_delay=0.0, max_queue=16, timeout_s=10)
    batcher.start()
    try:
        results = asyncio.run(_queue_and_run(batcher, recorder, [1.0, 2.0, 3.0, 4.0, 5.0]))
        assert results[:2] + results[3:] == [1.0, 2.0, 4.0, 5.0]
        assert isinstance(results[2], InferenceFailed) and "poison" not in str(results[2])
        assert recorder.batches[0] == [1.0, 2.0, 3.0, 4.0, 5.0]  # they did run together first
        assert asyncio.run(_queue_and_run(batcher, recorder, [7.0])) == [7.0]  # still serving
    finally:
        assert batcher.stop(5)


def test_deadline_passed_while_queued_gives_504_without_computing():
    recorder = Recorder()
    batcher = Batcher(recorder, ["m"], max_size=8, max_delay=0.0, max_queue=16, timeout_s=0.05)
    batcher.start()

    async def scenario():
        recorder.gate.clear()
        blocker = batcher.call(recorder.gate.wait, 10)
        batcher.reserve("m", 1)
        (future,) = batcher.submit("m", [np.array([9.0], np.float32)], attention=False)
        await asyncio.sleep(0.2)
        recorder.gate.set()
        await asyncio.wrap_future(blocker)
        return await asyncio.gather(future, return_exceptions=True)

    try:
        (result,) = asyncio.run(scenario())
        assert isinstance(result, DeadlineExceeded)
        assert recorder.batches == []
    finally:
        batcher.stop(5)


def test_queue_full_is_refused_before_decoding():
    batcher = Batcher(Recorder(), ["m"], max_size=8, max_delay=0.0, max_queue=3, timeout_s=1)
    batcher.reserve("m", 2)
    with pytest.raises(QueueFull, match="full"):
        batcher.reserve("m", 2)
    batcher.release("m", 2)
    batcher.reserve("m", 3)


def test_stop_finishes_what_is_queued():
    recorder = Recorder()
    batcher = Batcher(recorder, ["m"], max_size=2, max_delay=0.0, max_queue=16, timeout_s=10)
    batcher.start()

    async def scenario():
        recorder.gate.clear()
        batcher.call(recorder.gate.wait, 10)
        futures = []
        for v in range(5):
            batcher.reserve("m", 1)
            futures += batcher.submit("m", [np.array([float(v)], np.float32)], attention=False)
        stopper = asyncio.ensure_future(asyncio.to_thread(batcher.stop, 10))
        recorder.gate.set()
        assert await stopper
        return await asyncio.gather(*futures)

    assert asyncio.run(scenario()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [len(b) for b in recorder.batches] == [2, 2, 1]
