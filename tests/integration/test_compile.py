"""The compiled serving form for real: ``python -m service.compile`` builds the demo model's two forms once for this
module (about a minute of CPU), and every test reuses that cache: outputs equal eager (logits and masks, float32
and bf16), a warm cache serves compiled from the start without compiling, a first start serves eager and swaps the
compiled form in, ``auto`` times once and keeps its verdict, a corrupt package falls back to eager with the metric."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from service_testing import assert_same_predictions, image_bytes, metric_samples, noise_image, serving

from service import compiled, compiling
from service.compile import build_all
from service.compiled import FORMS, CompileCache, CompiledModel, compile_key, load_package
from service.inference import ModelRunner
from service.settings import Settings

DEMO = Path(__file__).parents[2] / "model_store" / "demo.safetensors"
# what the service under test runs with; the cache key follows these, so the CLI builds with the same
SERVICE = {"device": "cpu", "amp_dtype": "none", "max_batch_size": 4, "torch_threads": 1}
PNG = {"Content-Type": "image/png"}

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(shutil.which("g++") is None, reason="AOTInductor needs g++ (make system-deps)")]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("models")
    shutil.copy(DEMO, target / "demo.safetensors")
    return target


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory) -> tuple[Path, str]:
    """The CLI's cache of both forms, and what it printed."""
    cache = tmp_path_factory.mktemp("compile-cache")
    command = [sys.executable, "-m", "service.compile", "--model-dir", str(model_dir), "--cache", str(cache),
               "--device", "cpu", "--amp-dtype", "none", "--max-batch-size", "4", "--torch-threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stdout + done.stderr
    return cache, done.stdout


def runner_for(model_dir: Path, **kwargs) -> ModelRunner:
    return ModelRunner("demo", model_dir / "demo.safetensors", device="cpu", **{"amp_dtype": "none", **kwargs})


def cache_copy(built, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "cache"))


def package(cache: Path, form: str) -> Path:
    """Where the demo model's ``form`` lies in ``cache`` for the settings of :data:`SERVICE`."""
    runner = runner_for(DEMO.parent)
    return CompileCache(cache).package(compile_key(runner, 4, 1), form)


def test_the_cli_builds_both_forms_and_a_second_run_finds_them(built, model_dir, monkeypatch, capsys):
    cache, printed = built
    for form in FORMS:
        assert package(cache, form).stat().st_size > 0
        assert f"demo {form}: {package(cache, form)}" in printed
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    import torch._inductor

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: pytest.fail("recompiled"))
    settings = Settings(model_dir=model_dir, compile_cache=cache, **SERVICE)
    assert build_all(settings, None, list(FORMS), force=False) == 0
    assert capsys.readouterr().out.count(str(cache)) == 2


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Equal within ``tol`` of the larger of 1 and the expected values' magnitude."""
    scale = max(1.0, float(want.float().abs().max()))
    assert float((got.float() - want.float()).abs().max()) <= tol * scale


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_compiled_logits_and_masks_equal_eager(built, model_dir, batch):
    runner = runner_for(model_dir)
    forms = {form: load_package(package(built[0], form), runner.device) for form in FORMS}
    model = CompiledModel(runner.model, compiled.attention_names(runner), forms)
    x = runner._to_device(compiled.example_pixels(runner, batch, seed=batch))
    with torch.inference_mode():
        close(model(x), runner.model(x), 1e-3)
        logits, maps = model.forward_with_attention(x)
        want_logits, want_maps = runner.model.forward_with_attention(x)
    close(logits, want_logits, 1e-3)
    assert list(maps) == list(want_maps) and len(maps) == 9
    for name, amap in maps.items():
        for got, want in zip(amap, want_maps[name], strict=True):  # spatial, then channel
            assert got.shape == want.shape
            close(got, want, 1e-3)


def test_a_bf16_compiled_forward_equals_eager_within_bf16_precision(model_dir, tmp_path):
    """Where the CPU has native bf16 the runner computes in bf16; forced here so that every CPU tests it."""
    runner = runner_for(model_dir, amp_dtype="bfloat16", native_cpu_bf16=True)
    key = compile_key(runner, 4, 1)
    assert key.dtype == "bfloat16"
    path = compiled.build(runner, "forward", key, CompileCache(tmp_path))
    candidate = CompiledModel(runner.model, [], {"forward": load_package(path, runner.device)})
    x = runner._to_device(compiled.example_pixels(runner, 4))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = candidate(x), runner.model(x)
    assert got.dtype == torch.bfloat16
    close(got, want, 5e-2)
    assert compiled.mismatch(runner, candidate, "forward", (1, 4)) is None


async def predict_all(client, attention: bool = True) -> list[dict]:
    out = []
    for seed in range(3):
        resp = await client.post(f"/v1/predict?attention={str(attention).lower()}",
                                 content=image_bytes(noise_image(seed, 60, mode="L")), headers=PNG)
        assert resp.status_code == 200, resp.text
        out.extend(resp.json()["predictions"])
    return out


def assert_same_familiarity(got: list[dict], want: list[dict]) -> None:
    """The demo model carries an unfamiliar-input detector: it reads the compiled form's features."""
    assert all("familiar" in g for g in got)
    assert [g["familiar"] for g in got] == [w["familiar"] for w in want]
    assert [g["familiarity"] for g in got] == pytest.approx([w["familiarity"] for w in want], abs=1e-3)


def assert_same_masks(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert [a["module"] for a in g["attention"]] == [a["module"] for a in w["attention"]]
        for ga, wa in zip(g["attention"], w["attention"], strict=True):
            pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(a["png"]))), np.int16) for a in (ga, wa)]
            assert np.abs(pixels[0] - pixels[1]).max() <= 1


async def form_of(client) -> str:
    return (await client.get("/v1/models/demo")).json()["serving_form"]


@pytest.mark.parametrize("inference_process", [False, True], ids=["thread", "worker"])
async def test_a_warm_cache_serves_compiled_from_the_start_without_compiling(built, model_dir, tmp_path, monkeypatch,
                                                                            inference_process):
    """On the inference thread, and in the inference worker process (the default), which loads the forms itself
    and relays the metric."""
    async with serving(model_dir, tmp_path / "eager", **SERVICE, compile="off") as (_, client):
        assert await form_of(client) == "eager"
        eager = await predict_all(client)
    monkeypatch.setattr(compiling.Compiler, "_build", lambda *a: pytest.fail("compiled again"))
    async with serving(model_dir, tmp_path, **SERVICE, compile="on", compile_cache=built[0],
                       inference_process=inference_process) as (app, client):
        assert await form_of(client) == "compiled"
        assert (app.state.service.process is not None) == inference_process
        if not inference_process:
            assert app.state.service.compiler.pending == []
        got = await predict_all(client)
        metrics = (await client.get("/metrics")).text
    assert_same_predictions(got, eager, atol=1e-3)
    assert_same_masks(got, eager)
    assert_same_familiarity(got, eager)
    assert metric_samples(metrics, "macula_model_compiled") == {(("model", "demo"),): 1.0}
    assert metric_samples(metrics, "macula_compile_failures_total") == {}


async def test_a_first_start_serves_eager_and_swaps_the_compiled_form_in(built, model_dir, tmp_path, monkeypatch):
    """The background build is a child process; this one waits for a go-ahead, then 'builds' by copying."""
    go, cache = tmp_path / "go", tmp_path / "cache"
    script = ("import pathlib, shutil, sys, time\n"
              "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.05)\n"
              "pathlib.Path(sys.argv[3]).parent.mkdir(exist_ok=True)\n"
              "shutil.copy(sys.argv[2], sys.argv[3])\n")

    def command(runner, form):
        target = CompileCache(cache).package(compile_key(runner, 4, 1), form)
        return [sys.executable, "-c", script, str(go), str(package(built[0], form)), str(target)]

    monkeypatch.setattr(compiling.Compiler, "build_command", lambda self, runner, form: command(runner, form))
    async with serving(model_dir, tmp_path, **SERVICE, compile="on", compile_cache=cache) as (app, client):
        assert await form_of(client) == "eager"
        eager = await predict_all(client)
        go.touch()
        deadline = time.monotonic() + 120
        runner, thread = app.state.service.runner("demo"), app.state.service.compiler._thread
        while runner.compiled is None or "attention" not in runner.compiled.forms:
            assert thread.is_alive() and time.monotonic() < deadline, "the compiled forms were not swapped in"
            await asyncio.sleep(0.1)
        assert await form_of(client) == "compiled"
        got = await predict_all(client)
    assert_same_predictions(got, eager, atol=1e-3)
    assert_same_masks(got, eager)


async def test_auto_times_once_and_keeps_its_verdict(built, model_dir, tmp_path, monkeypatch):
    cache = cache_copy(built, tmp_path)
    monkeypatch.setattr(compiling.Compiler, "_build", lambda *a: pytest.fail("compiled again"))
    async with serving(model_dir, tmp_path, **SERVICE, compile="auto", compile_cache=cache) as (app, client):
        form = await form_of(client)
        metrics = (await client.get("/metrics")).text
    runner = runner_for(model_dir)
    verdict = CompileCache(cache).read_decision(compile_key(runner, 4, 1))
    assert verdict["batch"] == 4 and verdict["eager_s"] > 0 and verdict["compiled_s"] > 0
    assert form == ("compiled" if verdict["pays"] else "eager")
    ratio = metric_samples(metrics, "macula_compile_speedup_ratio")[(("model", "demo"),)]
    assert ratio == pytest.approx(verdict["eager_s"] / verdict["compiled_s"])
    monkeypatch.setattr(compiling.Compiler, "_measure", lambda *a: pytest.fail("timed again"))
    async with serving(model_dir, tmp_path / "again", **SERVICE, compile="auto", compile_cache=cache) as (_, client):
        assert await form_of(client) == form


async def test_a_corrupt_package_falls_back_to_eager_with_the_metric(built, model_dir, tmp_path, monkeypatch):
    cache = cache_copy(built, tmp_path)
    forward = package(cache, "forward")
    forward.write_bytes(forward.read_bytes()[: forward.stat().st_size // 2])  # truncated, as by a full disk
    monkeypatch.setattr(compiling.Compiler, "build_command", lambda self, runner, form: [sys.executable, "-c", "1/0"])
    async with serving(model_dir, tmp_path, **SERVICE, compile="on", compile_cache=cache) as (app, client):
        assert await form_of(client) == "eager"
        assert len(await predict_all(client)) == 3
        compiler = app.state.service.compiler
        compiler._thread.join(60)  # the rebuild (which fails here too)
        metrics = (await client.get("/metrics")).text
    failures = metric_samples(metrics, "macula_compile_failures_total")
    assert failures[(("model", "demo"), ("stage", "load"))] == 1
    assert metric_samples(metrics, "macula_model_compiled") == {(("model", "demo"),): 0.0}
    assert forward.with_suffix(".bad").exists()


async def test_a_corrupt_package_in_the_worker_falls_back_to_eager_with_the_metric(built, model_dir, tmp_path):
    cache = cache_copy(built, tmp_path)
    forward = package(cache, "forward")
    forward.write_bytes(forward.read_bytes()[: forward.stat().st_size // 2])
    async with serving(model_dir, tmp_path, **SERVICE, compile="on", compile_cache=cache,
                       inference_process=True) as (_, client):
        assert await form_of(client) == "eager"
        assert len(await predict_all(client)) == 3  # the worker rebuilds meanwhile; stopping the service kills it
        metrics = (await client.get("/metrics")).text
    failures = metric_samples(metrics, "macula_compile_failures_total")
    assert failures[(("model", "demo"), ("stage", "load"))] == 1
    assert metric_samples(metrics, "macula_model_compiled") == {(("model", "demo"),): 0.0}
    assert forward.with_suffix(".bad").exists()
