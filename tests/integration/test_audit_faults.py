"""PostgreSQL stopped under load: best-effort keeps answering 200 and counts what it drops, durable answers 503
``audit_unavailable`` meanwhile and loses nothing it answered 200; both reconnect by themselves when the server
is back. The server here is the tests' own (tests/integration/audit_pg.py), stopped and restarted on its port."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.audit import open_backend
from tests.integration.audit_pg import postgres_cluster
from tests.integration.service_testing import image_bytes, metric_samples, noise_image, serving

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
CLIENTS = 6
OUTAGE_S = 1.5
RECOVERED_S = 4.0   # after the restart: past the writer's longest backoff (2 s) and a reconnect, with margin


@pytest.fixture(scope="module")
def cluster():
    with postgres_cluster() as server:   # its own server: these tests stop it
        yield server


class Load:
    """``CLIENTS`` concurrent clients posting images until told to stop; every answer is kept with its time."""

    def __init__(self, client) -> None:
        self.client = client
        self.answers: list[tuple[float, int, dict]] = []
        self.running = True
        self.blob = image_bytes(noise_image(0, size=32), "PNG")

    async def client_loop(self) -> None:
        while self.running:
            resp = await self.client.post("/v1/predict", content=self.blob, headers={"Content-Type": "image/png"})
            self.answers.append((time.monotonic(), resp.status_code, {**resp.json(), **resp.headers}))

    async def until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    def since(self, moment: float) -> list[tuple[float, int, dict]]:
        return [answer for answer in self.answers if answer[0] >= moment]


async def run_outage(client, cluster) -> tuple[Load, float, float]:
    """Load → server stopped for OUTAGE_S → started again → load until answers are 200 with a fresh record."""
    load = Load(client)
    clients = [asyncio.create_task(load.client_loop()) for _ in range(CLIENTS)]
    try:
        await load.until(lambda: len(load.answers) >= 10, 30, "answers before the outage")
        await asyncio.to_thread(cluster.stop)
        stopped = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(cluster.start)
        restarted = time.monotonic()
        await load.until(lambda: sum(code == 200 for _, code, _ in load.since(restarted + RECOVERED_S)) >= 10, 40,
                         "200s after the server came back")
    finally:
        load.running = False
        await asyncio.gather(*clients, return_exceptions=True)
    return load, stopped, restarted


async def test_durable_answers_503_while_postgresql_is_down_and_loses_nothing(model_dir, tmp_path, cluster):
    url = cluster.create_database()
    async with serving(model_dir, tmp_path, audit_url=url, audit_durable=True, audit_commit_timeout_s=3) as (
            app, client):
        load, stopped, restarted = await run_outage(client, cluster)
        metrics = (await client.get("/metrics")).text
    codes = {code for _, code, _ in load.answers}
    assert codes <= {200, 503}, codes
    refused = [body for _, code, body in load.answers if code == 503]
    assert refused and all(b["code"] == "audit_unavailable" and b["retry-after"] for b in refused)
    assert any(code == 503 for _, code, _ in load.since(stopped + 0.5))
    answered = [body["id"] for _, code, body in load.answers if code == 200]
    backend = open_backend(url)
    backend.open()
    try:
        lost = [pid for pid in answered if backend.get(pid) is None]
    finally:
        backend.close()
    assert lost == [] and len(answered) >= 20
    assert metric_samples(metrics, "macula_audit_reconnects_total")[(("backend", "postgresql"),)] >= 1
    refused_count = metric_samples(metrics, "macula_audit_dropped_records_total")[
        (("backend", "postgresql"), ("reason", "refused"))]
    assert refused_count >= len(refused)


async def test_best_effort_keeps_serving_while_postgresql_is_down(model_dir, tmp_path, cluster):
    url = cluster.create_database()
    async with serving(model_dir, tmp_path, audit_url=url) as (app, client):
        load, stopped, restarted = await run_outage(client, cluster)
        store = app.state.service.audit
        assert await asyncio.to_thread(store.flush, 10)
        metrics = (await client.get("/metrics")).text
        late = [body["id"] for moment, code, body in load.answers if moment > restarted + RECOVERED_S]
        found = [(await client.get(f"/v1/predictions/{pid}")).status_code for pid in late]
    assert {code for _, code, _ in load.answers} == {200}   # the trail failing never fails a prediction
    samples = metric_samples(metrics, "macula_audit_dropped_records_total")
    assert samples[(("backend", "postgresql"), ("reason", "store_unavailable"))] >= 1
    assert metric_samples(metrics, "macula_audit_reconnects_total")[(("backend", "postgresql"),)] >= 1
    assert metric_samples(metrics, "macula_audit_store_up")[(("backend", "postgresql"),)] == 1
    assert late and found == [200] * len(late)   # written again once the server was back
