"""Dynamic batching through the real app: concurrent requests share batches without changing results; a poisoned
image fails alone; a full queue answers 503 fast; deadlines give 504; a vanished client's image is skipped."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from service_testing import assert_same_predictions, image_bytes, metric_samples, noise_image, serving

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}


class Blocked:
    """Holds the inference thread busy until released, so that requests pile up in the queue."""

    def __init__(self, service) -> None:
        self.service, self.event = service, threading.Event()

    async def __aenter__(self) -> Blocked:
        self.job = self.service.batcher.call(self.event.wait, 30)
        return self

    async def wait_queued(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.service.batcher.queued("gray") < count:
            assert time.monotonic() < deadline, f"only {self.service.batcher.queued('gray')} of {count} queued"
            await asyncio.sleep(0.01)

    async def __aexit__(self, *exc) -> None:
        self.event.set()
        await asyncio.wrap_future(self.job)


def spy_on_runs(service, poison_value: float | None = None) -> list[np.ndarray]:
    """Record every batch the model runs; fail batches holding an image whose pixels are all ``poison_value``."""
    runner, seen = service.runners["gray"], []
    real_run = runner.run

    def run(inputs, attention=False):
        seen.append(inputs.copy())
        if poison_value is not None and any(np.all(x == poison_value) for x in inputs):
            raise RuntimeError("poison detected: secret internal detail")
        return real_run(inputs, attention)

    runner.run = run
    return seen


async def test_concurrent_requests_form_batches_and_match_sequential_scores(model_dir, tmp_path):
    blobs = [image_bytes(noise_image(i, 36, "L")) for i in range(32)]
    async with serving(model_dir, tmp_path) as (app, client):
        one_by_one = [(await client.post("/v1/predict?top_k=10", content=b, headers=PNG)).json() for b in blobs]
        before = metric_samples((await client.get("/metrics")).text, "macula_batch_size_count")
        together = await asyncio.gather(*(client.post("/v1/predict?top_k=10", content=b, headers=PNG)
                                          for b in blobs))
        text = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in together)
    for alone, batched in zip(one_by_one, together, strict=True):
        assert_same_predictions(batched.json()["predictions"], alone["predictions"], atol=1e-4)
    key = (("model", "gray"),)
    batches = metric_samples(text, "macula_batch_size_count")[key] - before[key]
    images = metric_samples(text, "macula_batch_size_sum")[key] - 32  # the sequential ones were batches of 1
    assert images == 32 and batches < 32, f"32 concurrent images ran in {batches} batches: no batching happened"


async def test_poisoned_image_fails_alone(model_dir, tmp_path):
    good = [image_bytes(noise_image(i, 36, "L")) for i in range(4)]
    black = image_bytes(noise_image(0, 36, "L").point(lambda _: 0))  # its pixels reach the runner as all zeros
    async with serving(model_dir, tmp_path) as (app, client):
        service = app.state.service
        alone = [(await client.post("/v1/predict", content=b, headers=PNG)).json() for b in good]
        seen = spy_on_runs(service, poison_value=0)
        async with Blocked(service) as blocked:
            tasks = [asyncio.ensure_future(client.post("/v1/predict", content=b, headers=PNG))
                     for b in (*good[:2], black, *good[2:])]
            await blocked.wait_queued(5)
        answers = await asyncio.gather(*tasks)
        assert len(seen[0]) == 5  # the poisoned image really was in a batch with the others
        statuses = [a.status_code for a in answers]
        assert statuses == [200, 200, 500, 200, 200]
        assert answers[2].json()["code"] == "internal_error" and "secret" not in answers[2].text
        for expected, got in zip(alone, [answers[i] for i in (0, 1, 3, 4)], strict=True):
            assert_same_predictions(got.json()["predictions"], expected["predictions"])
        assert (await client.post("/v1/predict", content=good[0], headers=PNG)).status_code == 200


async def test_full_queue_answers_503_fast(model_dir, tmp_path):
    blob = image_bytes(noise_image(7, 36, "L"))
    async with serving(model_dir, tmp_path, max_queue=3) as (app, client):
        async with Blocked(app.state.service) as blocked:
            queued = [asyncio.ensure_future(client.post("/v1/predict", content=blob, headers=PNG)) for _ in range(3)]
            await blocked.wait_queued(3)
            start = time.perf_counter()
            refused = await client.post("/v1/predict", content=blob, headers=PNG)
            elapsed = time.perf_counter() - start
        assert refused.status_code == 503 and refused.json()["code"] == "overloaded"
        assert int(refused.headers["Retry-After"]) >= 1 and elapsed < 1.0
        assert [r.status_code for r in await asyncio.gather(*queued)] == [200, 200, 200]
        text = (await client.get("/metrics")).text
    assert metric_samples(text, "macula_rejections_total")[(("reason", "overload"),)] == 1


async def test_deadline_passed_in_queue_gives_504_and_is_not_computed(model_dir, tmp_path):
    blob = image_bytes(noise_image(8, 36, "L"))
    async with serving(model_dir, tmp_path, request_timeout_s=0.2) as (app, client):
        seen = spy_on_runs(app.state.service)
        async with Blocked(app.state.service) as blocked:
            late = asyncio.ensure_future(client.post("/v1/predict", content=blob, headers=PNG))
            await blocked.wait_queued(1)
            await asyncio.sleep(0.4)
        answer = await late
        assert answer.status_code == 504 and answer.json()["code"] == "deadline_exceeded"
        assert seen == []
        assert (await client.post("/v1/predict", content=blob, headers=PNG)).status_code == 200


async def test_vanished_client_is_skipped(model_dir, tmp_path):
    blob = image_bytes(noise_image(9, 36, "L"))
    async with serving(model_dir, tmp_path) as (app, client):
        seen = spy_on_runs(app.state.service)
        async with Blocked(app.state.service) as blocked:
            gone = asyncio.ensure_future(client.post("/v1/predict", content=blob, headers=PNG))
            await blocked.wait_queued(1)
            gone.cancel()
            await asyncio.sleep(0.05)
        assert (await client.post("/v1/predict", content=blob, headers=PNG)).status_code == 200
        assert len(seen) == 1 and len(seen[0]) == 1  # only the second request ever ran


async def test_a_lone_client_never_waits_out_the_batch_delay(model_dir, tmp_path):
    blob = image_bytes(noise_image(11, 36, "L"))
    async with serving(model_dir, tmp_path, max_batch_delay_ms=20_000) as (app, client):
        start = time.perf_counter()
        for _ in range(3):
            assert (await client.post("/v1/predict", content=blob, headers=PNG)).status_code == 200
        assert time.perf_counter() - start < 10  # a 20 s delay was never waited out
