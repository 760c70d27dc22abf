"""The inference worker process (``MACULA_INFERENCE_PROCESS``, the default): same answers as the models run in the
server's own thread; a batch failure inside the worker is split by the batcher as before; a dead worker turns into
503s and a restart; the worker dies with the server, even on SIGKILL; readiness says what is going on."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from service_testing import assert_same_predictions, image_bytes, metric_samples, model_dir_with, noise_image, serving

from models import CheckpointError
from service.app import create_app
from service.batching import Batcher, InferenceFailed
from service.compiled import CompileCache
from service.inference import ModelRunner
from service.inference_process import InferenceProcess, InferenceUnavailable, WorkerFailure
from service.metrics import Metrics
from service.settings import Settings
from service.tuning import plan_for, tune

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}
POISON_WORKER = [sys.executable, str(Path(__file__).with_name("poison_worker.py"))]
SETTINGS = {"device": "cpu", "amp_dtype": "none", "max_batch_size": 4, "audit_db": ""}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gray_checkpoint, rgb_checkpoint):
    return model_dir_with(tmp_path_factory.mktemp("models"), gray=gray_checkpoint, rgb=rgb_checkpoint)


def started(checkpoints: dict[str, Path], **kwargs) -> InferenceProcess:
    process = InferenceProcess(Settings(**SETTINGS), checkpoints, **kwargs)
    process.start()
    process.wait_ready(120)
    return process


def wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def pixels(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_worker_answers_like_the_model_in_this_process(gray_checkpoint, rgb_checkpoint):
    process = started({"gray": gray_checkpoint, "rgb": rgb_checkpoint})
    try:
        for name, path in (("gray", gray_checkpoint), ("rgb", rgb_checkpoint)):
            local = ModelRunner(name, path, amp_dtype="none")
            remote = process.models[name]
            assert remote.meta.version == local.meta.version and remote.meta.class_names == local.meta.class_names
            assert remote.precision == "float32" and remote.input_shape == local.input_shape
            for n, attention in ((1, False), (3, True), (4, True)):
                x = pixels(local.input_shape, n, seed=n)
                want, got = local.run(x, attention), remote.run(x, attention)
                assert len(got) == n
                for w, g in zip(want, got, strict=True):
                    np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5, atol=1e-6)
                    assert (g.masks is None) == (not attention)
                    if attention:
                        assert list(g.masks) == local.attention_modules == remote.attention_modules
                        for module, mask in w.masks.items():
                            assert np.abs(g.masks[module].astype(int) - mask).max() <= 1
    finally:
        process.stop()


# what a ModelRunner holds that only the worker needs; every other attribute the service may read, so a RemoteModel
# must show it too (a new runner attribute makes this test fail until the worker passes it on)
WORKER_ONLY = {"model", "device", "memory_format", "amp_dtype", "pixel_mean", "pixel_std", "compiled"}


def test_a_remote_model_shows_what_a_runner_shows_the_service(gray_checkpoint, tmp_path):
    process = started({"gray": gray_checkpoint})
    try:
        plan = plan_for(Settings(**SETTINGS), "cpu")  # as the worker loads it
        local = ModelRunner("gray", gray_checkpoint, amp_dtype="none", max_batch_size=plan.first_batch_size)
        tune(local, plan, CompileCache(tmp_path))
        remote = process.models["gray"]
        local.warm_up(SETTINGS["max_batch_size"])
        public = {name for name in dir(local) if not name.startswith("_")} - WORKER_ONLY
        for name in public:
            value = getattr(local, name)
            if not callable(value):
                assert getattr(remote, name) == value, name
        assert {"run", "warm_up"} <= {name for name in public if callable(getattr(local, name))}
    finally:
        process.stop()


def test_familiarity_and_calibration_come_through_the_worker(tmp_path):
    from tests.calibrated import make_calibrated_checkpoint, shapes

    path = make_calibrated_checkpoint(tmp_path / "shapes.safetensors")
    process = started({"shapes": path})
    try:
        local, remote = ModelRunner("shapes", path, amp_dtype="none"), process.models["shapes"]
        assert remote.meta.calibration.to_json() == local.meta.calibration.to_json()
        assert remote.meta.calibration.detector is not None
        images = shapes(2, seed=3)[0].numpy()[..., None]
        x = np.concatenate([images, pixels(local.input_shape, 2, seed=3)])  # drawn like the training data, noise
        for want, got in zip(local.run(x), remote.run(x), strict=True):
            assert got.familiar == want.familiar and got.familiarity == pytest.approx(want.familiarity, rel=1e-5)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    finally:
        process.stop()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_worker_on_cuda_answers_like_the_cpu_runner_and_reports_its_memory(rgb_checkpoint):
    metrics = Metrics()
    process = InferenceProcess(Settings(**{**SETTINGS, "device": "cuda"}), {"rgb": rgb_checkpoint}, metrics=metrics)
    process.start()
    try:
        process.wait_ready(300)
        local = ModelRunner("rgb", rgb_checkpoint, amp_dtype="none")
        x = pixels(local.input_shape, 4, seed=5)
        for want, got in zip(local.run(x, True), process.run("rgb", x, True), strict=True):
            np.testing.assert_allclose(got.scores, want.scores, atol=2e-3)  # TF32 convolutions on the GPU
            assert list(got.masks) == list(want.masks)
        memory = metric_samples(metrics.render()[0].decode(), "macula_gpu_memory_bytes")
        assert memory[(("device", "cuda"), ("kind", "allocated"))] > 0
    finally:
        process.stop()


def test_a_batch_failing_in_the_worker_is_split_by_the_batcher(gray_checkpoint):
    process = started({"gray": gray_checkpoint}, command=POISON_WORKER)
    try:
        shape = process.models["gray"].input_shape
        x, poison = pixels(shape, 3, seed=1), np.full(shape, 7, np.uint8)
        with pytest.raises(WorkerFailure, match="poison detected"):
            process.run("gray", np.concatenate([x, poison[None]]), False)
        assert len(process.run("gray", x, False)) == 3  # the worker goes on
        batcher = Batcher(lambda model, inputs, attention: process.run(model, inputs, attention), ["gray"],
                          max_size=4, max_delay=0.5, max_queue=8, timeout_s=60)
        batcher.start()

        async def submit() -> list:
            batcher.reserve("gray", 4)
            futures = batcher.submit("gray", [x[0], x[1], poison, x[2]], attention=False)
            return await asyncio.gather(*futures, return_exceptions=True)

        answers = asyncio.run(submit())
        batcher.stop(10)
        assert [type(a).__name__ for a in answers] == ["ImageResult", "ImageResult", "InferenceFailed", "ImageResult"]
        assert isinstance(answers[2], InferenceFailed)
    finally:
        process.stop()


def test_a_killed_worker_answers_unavailable_then_comes_back(gray_checkpoint):
    metrics = Metrics()
    process = started({"gray": gray_checkpoint}, metrics=metrics)
    try:
        x = pixels(process.models["gray"].input_shape, 2, seed=2)
        before = process.run("gray", x, True)
        os.kill(process._conn.proc.pid, signal.SIGKILL)
        with pytest.raises(InferenceUnavailable):
            wait_until(lambda: not process.ready, 30)
            process.run("gray", x, True)
        wait_until(lambda: process.ready)
        after = process.run("gray", x, True)
        np.testing.assert_allclose(after[0].scores, before[0].scores, rtol=1e-5, atol=1e-6)
        assert metric_samples(metrics.render()[0].decode(), "macula_inference_worker_restarts_total") == {(): 1.0}
    finally:
        process.stop()


def test_a_broken_checkpoint_fails_the_start(tmp_path, gray_checkpoint):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\0" * 100)
    process = InferenceProcess(Settings(**SETTINGS), {"gray": gray_checkpoint, "broken": broken})
    process.start()
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        process.wait_ready(120)
    assert process.state == "failed"
    process.stop()


def test_the_worker_dies_with_the_server_even_on_sigkill(tmp_path, gray_checkpoint):
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from service.inference_process import InferenceProcess
        from service.settings import Settings
        process = InferenceProcess(Settings(**{SETTINGS!r}), {{"gray": Path({str(gray_checkpoint)!r})}})
        process.start()
        process.wait_ready(120)
        print(process._conn.proc.pid, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        worker = int(server.stdout.readline())
        os.kill(worker, 0)  # alive
        server.kill()
        server.wait()
        wait_until(lambda: not _alive(worker), 30)
    finally:
        server.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (already dead, not yet reaped) counts as gone
            return stat.read().split(") ")[1][0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


async def test_the_app_in_process_mode_answers_like_thread_mode(model_dir, tmp_path):
    blobs = [image_bytes(noise_image(seed, mode=mode)) for seed, mode in ((1, "L"), (2, "RGB"), (3, "L"))]
    answers = {}
    for in_process in (False, True):
        async with serving(model_dir, tmp_path, inference_process=in_process) as (app, client):
            assert (await client.get("/readyz")).status_code == 200
            resp = await client.post("/v1/models/gray/predict?attention=true&top_k=3",
                                     files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
            assert resp.status_code == 200, resp.text
            answers[in_process] = resp.json()["predictions"]
            worker = app.state.service.process
            assert (worker is not None) == in_process
            pid = worker._conn.proc.pid if in_process else None
    assert_same_predictions(answers[True], answers[False])
    for got, want in zip(answers[True], answers[False], strict=True):
        assert [a["module"] for a in got["attention"]] == [a["module"] for a in want["attention"]]
    assert worker.state == "stopped" and not _alive(pid)  # stopped with the app


async def test_readiness_says_why_while_loading_and_the_port_is_open_meanwhile(model_dir, tmp_path):
    for in_process in (True, False):
        app = create_app(Settings(model_dir=model_dir, **{**SETTINGS, "inference_process": in_process}))
        async with app.router.lifespan_context(app):
            import httpx

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://macula.test") as client:
                early = await client.get("/readyz")
                health = await client.get("/healthz")
                predict = await client.post("/v1/predict", content=image_bytes(noise_image(1)), headers=PNG)
                await app.state.service.wait_started()
                ready = await client.get("/readyz")
        assert early.status_code == 503 and early.headers["Retry-After"]
        body = early.json()
        assert body["code"] == "not_ready" and body["reason"] in ("starting", "loading", "warming up"), body
        assert health.status_code == 200
        assert predict.status_code == 503 and predict.json()["code"] == "not_ready"
        assert ready.status_code == 200


async def test_a_dead_worker_turns_into_503s_then_the_app_serves_again(model_dir, tmp_path):
    blob = image_bytes(noise_image(5))
    async with serving(model_dir, tmp_path, inference_process=True) as (app, client):
        before = await client.post("/v1/predict", content=blob, headers=PNG)
        os.kill(app.state.service.process._conn.proc.pid, signal.SIGKILL)
        while (await client.get("/readyz")).status_code == 200:  # until the server has noticed
            await asyncio.sleep(0.01)
        seen = set()
        while True:  # until the new worker serves
            ready, health = await client.get("/readyz"), await client.get("/healthz")
            assert health.status_code == 200
            if ready.status_code == 200:
                break
            seen.add(ready.json()["reason"])
            refused = await client.post("/v1/predict", content=blob, headers=PNG)
            if refused.status_code == 200:  # the new worker came up since /readyz answered
                break
            assert (refused.status_code, refused.json()["code"]) == (503, "not_ready")
            assert refused.headers["Retry-After"]
            await asyncio.sleep(0.02)
        after = await client.post("/v1/predict", content=blob, headers=PNG)
        restarts = metric_samples((await client.get("/metrics")).text, "macula_inference_worker_restarts_total")
    assert seen == {"restarting"} and restarts == {(): 1.0}
    assert before.status_code == after.status_code == 200
    assert_same_predictions(after.json()["predictions"], before.json()["predictions"])


def test_the_cli_exits_non_zero_when_the_models_cannot_load(tmp_path, gray_checkpoint):
    models = model_dir_with(tmp_path / "models", gray=gray_checkpoint)
    (models / "broken.safetensors").write_bytes(b"\0" * 100)
    run = subprocess.run([sys.executable, "-m", "service", "--model-dir", str(models), "--port", "0",
                          "--audit-db", ""], capture_output=True, text=True, timeout=240,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode != 0 and "broken.safetensors" in run.stderr, run.stderr[-2000:]
