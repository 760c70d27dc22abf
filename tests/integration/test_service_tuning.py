"""A service started with ``MACULA_TUNE=auto`` times each model once, shows the choice in ``/v1/models/{name}`` and
the metrics, keeps it in the compile cache for the next start, and never batches past a model's cap; forced
settings are shown as ``configured`` and never timed. Thread mode and the inference worker process alike."""

from __future__ import annotations

import asyncio

import pytest
from service_testing import image_bytes, metric_samples, model_dir_with, noise_image, serving

from service import tuning

pytestmark = pytest.mark.anyio
CEILING = 4  # timed at batch 1, 2 and 4: a cheap tuning, and every cap a batch-size histogram bucket
# Kept however unsteady the timings (a busy test host): that timings are kept is what is tested here.
AUTO = {"tune": "auto", "channels_last": None, "max_batch_size": None, "max_batch_ceiling": CEILING,
        "tune_max_spread": 1e9}
TUNED = {"max_batch_size": "tuned", "memory_format": "tuned"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gray_checkpoint, rgb_checkpoint):
    return model_dir_with(tmp_path_factory.mktemp("models"), gray=gray_checkpoint, rgb=rgb_checkpoint)


async def shown(client) -> tuple[dict[str, dict], str]:
    """Each model's choice as /v1/models shows it, and a metrics scrape."""
    models = (await client.get("/v1/models")).json()["models"]
    choice = {m["name"]: {k: m[k] for k in ("max_batch_size", "memory_format", "tuning")} for m in models}
    for name in choice:
        assert {k: v for k, v in (await client.get(f"/v1/models/{name}")).json().items() if k in choice[name]} == \
            choice[name]
    return choice, (await client.get("/metrics")).text


def assert_metrics_match(choice: dict[str, dict], metrics: str) -> None:
    caps = metric_samples(metrics, "macula_model_max_batch_size")
    layouts = metric_samples(metrics, "macula_model_channels_last")
    for name, c in choice.items():
        assert caps[(("model", name),)] == c["max_batch_size"]
        assert layouts[(("model", name),)] == (1 if c["memory_format"] == "channels_last" else 0)


async def classify_many(client, model: str, count: int) -> None:
    """``count`` images at once: requests of 3 images each, all in flight together."""
    blob = image_bytes(noise_image(1))
    files = [("file", (f"{i}.png", blob, "image/png")) for i in range(3)]
    answers = await asyncio.gather(*(client.post(f"/v1/models/{model}/predict", files=files)
                                     for _ in range(count // 3)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]


def assert_batches_within_caps(choice: dict[str, dict], metrics: str) -> None:
    buckets = metric_samples(metrics, "macula_batch_size_bucket")
    counts = metric_samples(metrics, "macula_batch_size_count")
    for name, c in choice.items():
        total = counts[(("model", name),)]
        assert total > 0
        assert buckets[(("le", f"{float(c['max_batch_size'])}"), ("model", name))] == total


@pytest.mark.parametrize("in_process", [False, True])
async def test_a_tuned_start_shows_its_choice_keeps_it_and_batches_within_it(model_dir, tmp_path, monkeypatch,
                                                                              capfd, in_process):
    cache = tmp_path / "cache"
    settings = {**AUTO, "compile_cache": str(cache), "inference_process": in_process}
    timed = []
    real = tuning.time_forward
    monkeypatch.setattr(tuning, "time_forward", lambda *args: timed.append(args[2]) or real(*args))
    async with serving(model_dir, tmp_path, **settings) as (app, client):
        first, metrics = await shown(client)
        for name in ("gray", "rgb"):
            await classify_many(client, name, 12)
        metrics = (await client.get("/metrics")).text
        batcher = app.state.service.batcher
        assert {name: batcher.max_size_of(name) for name in first} == {n: c["max_batch_size"] for n, c in first.items()}
    for c in first.values():
        assert 1 <= c["max_batch_size"] <= CEILING and c["memory_format"] in ("channels_last", "contiguous")
        assert c["tuning"] == TUNED
    assert_metrics_match(first, metrics)
    assert_batches_within_caps(first, metrics)
    kept = sorted(cache.glob("*.tuning.json"))
    assert len(kept) == 2  # one per model
    assert bool(timed) == (not in_process)  # in process mode the worker, a process of its own, timed them
    stamps = {path: path.stat().st_mtime_ns for path in kept}

    timed.clear()
    capfd.readouterr()
    async with serving(model_dir, tmp_path, **settings) as (app, client):
        again, metrics = await shown(client)
    assert again == first and timed == []
    assert {path: path.stat().st_mtime_ns for path in kept} == stamps  # read, not timed and written again
    assert_metrics_match(again, metrics)
    if in_process:  # the worker's log (its stderr is this process's)
        err = capfd.readouterr().err
        assert err.count("as timed before") == 2 and "timed channels_last and contiguous" not in err


@pytest.mark.parametrize("in_process", [False, True])
async def test_forced_settings_are_shown_as_configured_and_never_timed(model_dir, tmp_path, monkeypatch, in_process):
    monkeypatch.setattr(tuning, "time_forward", lambda *args: pytest.fail("timed"))
    cache = tmp_path / "cache"
    settings = {"tune": "auto", "channels_last": False, "max_batch_size": 3, "compile_cache": str(cache),
                "inference_process": in_process}
    async with serving(model_dir, tmp_path, **settings) as (app, client):
        choice, metrics = await shown(client)
        await classify_many(client, "gray", 9)
        assert app.state.service.batcher.max_size_of("gray") == 3
        sizes = metric_samples((await client.get("/metrics")).text, "macula_batch_size_bucket")
    configured = {"max_batch_size": 3, "memory_format": "contiguous",
                  "tuning": {"max_batch_size": "configured", "memory_format": "configured"}}
    assert choice == {"gray": configured, "rgb": configured}
    assert_metrics_match(choice, metrics)
    assert sizes[(("le", "4.0"), ("model", "gray"))] == sizes[(("le", "+Inf"), ("model", "gray"))] > 0
    assert not cache.exists() or list(cache.glob("*.tuning.json")) == []


async def test_tune_off_serves_the_fixed_defaults(model_dir, tmp_path):
    async with serving(model_dir, tmp_path, tune="off", channels_last=None, max_batch_size=None) as (app, client):
        choice, metrics = await shown(client)
    default = {"max_batch_size": 8, "memory_format": "channels_last",
               "tuning": {"max_batch_size": "default", "memory_format": "default"}}
    assert choice == {"gray": default, "rgb": default}
    assert_metrics_match(choice, metrics)
