"""The one error table and the fair decode pool, without a server."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from fastapi import FastAPI

from service import batching, codec, inputs, limits, state
from service.decoding import DecodePool
from service.errors import CODES, ERRORS, ServiceError, classify, install
from service.metrics import REJECTION_REASONS, Metrics


def test_every_error_has_one_status_code_and_reason():
    for cls, code in ERRORS.items():
        assert code in CODES, cls
        assert classify(cls.__new__(cls))[0] == code, cls
    assert {rule.reason for rule in CODES.values()} - {None} <= REJECTION_REASONS
    # no rejection reason: the server's own faults (a bug; the audit store down in durable mode), counted elsewhere
    assert {code for code, rule in CODES.items() if rule.reason is None} == {"internal_error", "audit_unavailable"}


def test_framework_errors_keep_a_4xx():
    from starlette.exceptions import HTTPException

    assert classify(HTTPException(405, headers={"Allow": "GET"})) == ("method_not_allowed", "Method Not Allowed",
                                                                       {"Allow": "GET"})
    assert classify(HTTPException(409, "conflict"))[0] == "bad_request"
    assert classify(HTTPException(502, "bad gateway"))[0] == "internal_error"


def test_domain_exceptions_know_nothing_of_http():
    for module in (batching, codec, inputs, limits):
        source = Path(module.__file__).read_text()
        assert "status" not in source.replace("status_code", "") or module is limits, module.__name__
        assert "from .errors" not in source and "fastapi" not in source, module.__name__
    for cls in ERRORS:
        assert not issubclass(cls, ServiceError) and not hasattr(cls, "status"), cls


def test_an_unknown_exception_is_an_internal_error_that_echoes_nothing():
    code, detail, _ = classify(RuntimeError("secret internal detail"))
    assert code == "internal_error" and "secret" not in detail


def test_service_error_code_and_status_must_agree():
    assert ServiceError(404, "model_not_found", "x").code == "model_not_found"
    with pytest.raises(ValueError, match="status 404"):
        ServiceError(400, "model_not_found", "x")


def test_handlers_are_installed_once_and_never_silently_replaced():
    app = FastAPI()
    install(app, Metrics())
    handlers = {app.exception_handlers[cls] for cls in ERRORS}
    assert len(handlers) == 1  # one handler for the whole table
    with pytest.raises(RuntimeError, match="already installed"):
        install(app, Metrics())


def test_decode_pool_shares_threads_round_robin_between_requests():
    """A request with many images cannot make a later one-image request wait behind all of them."""
    order: list[str] = []
    gates = {name: threading.Event() for name in ("a0", "a1", "a2", "a3", "b0")}

    def job(name: str) -> str:
        order.append(name)
        gates[name].wait(10)
        return name

    async def scenario():
        pool = DecodePool(1, budget_bytes=100)
        big, small = pool.share(), pool.share()
        jobs = [asyncio.ensure_future(pool.run(big, job, f"a{i}")) for i in range(4)]
        await asyncio.sleep(0)
        late = asyncio.ensure_future(pool.run(small, job, "b0"))
        await asyncio.sleep(0)
        for gate in gates.values():  # release in any order: the pool decides who runs next
            gate.set()
        results = await asyncio.gather(*jobs, late)
        pool.shutdown()
        return results

    assert asyncio.run(scenario()) == ["a0", "a1", "a2", "a3", "b0"]
    assert order[:2] == ["a0", "b0"], order  # the one-image request went second, not fifth


def test_decode_pool_keeps_a_request_within_its_memory_budget():
    running, peak, lock = [0], [0], threading.Lock()
    release = threading.Event()

    def job(cost: int) -> int:
        with lock:
            running[0] += cost
            peak[0] = max(peak[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= cost
        return cost

    async def scenario():
        pool = DecodePool(4, budget_bytes=100)
        share = pool.share()
        jobs = [asyncio.ensure_future(pool.run(share, job, 60, cost=60)) for _ in range(3)]
        jobs.append(asyncio.ensure_future(pool.run(share, job, 30, cost=30)))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(*jobs)
        pool.shutdown()

    asyncio.run(scenario())
    assert peak[0] <= 100  # 4 threads free, but never more than the budget at once


def test_a_cancelled_waiting_job_never_runs():
    ran, gate = [], threading.Event()

    async def scenario():
        pool = DecodePool(1, budget_bytes=10)
        share = pool.share()
        first = asyncio.ensure_future(pool.run(share, lambda: gate.wait(10)))
        second = asyncio.ensure_future(pool.run(share, ran.append, "second"))
        await asyncio.sleep(0)
        second.cancel()
        gate.set()
        await first
        await asyncio.sleep(0.05)
        pool.shutdown()

    asyncio.run(scenario())
    assert ran == []


def test_state_errors_are_plain_exceptions():
    assert classify(state.NotReady())[0] == "not_ready"
    assert classify(state.MasksTooLarge("x"))[0] == "response_too_large"
