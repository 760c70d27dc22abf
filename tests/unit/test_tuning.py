"""Choosing each model's batch cap and memory format (service/tuning.py) without trusting any clock: the choice on
synthetic timings, the time-boxed measurement with a stand-in forward, what the settings leave open, and
:func:`tune` on a real runner with a stand-in timer: the verdict kept and read back, forced settings never timed,
a cache that cannot be written."""

from __future__ import annotations

import itertools
import json
import socket

import numpy as np
import pytest
import torch

from service import tuning
from service.batching import Batcher
from service.compiled import CompileCache
from service.inference import ModelRunner
from service.settings import Settings
from service.tuning import Plan, choose, measure_samples, medians, plan_for, read_timings, tune, tune_key

OPEN = {"max_batch_size": "tuned", "memory_format": "tuned"}


def rates_to_seconds(rates: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """images/s per format and batch size -> seconds per forward."""
    return {fmt: {size: size / rate for size, rate in by_size.items()} for fmt, by_size in rates.items()}


# ---------------------------------------------------------------------------------------------------- choose


def test_the_format_with_the_best_peak_wins_and_the_cap_is_the_smallest_batch_near_that_peak():
    timings = rates_to_seconds({"channels_last": {1: 20.0, 2: 30.0, 4: 38.0, 8: 40.0, 16: 39.0},
                                "contiguous": {1: 25.0, 2: 33.0, 4: 36.0, 8: 35.0, 16: 30.0}})
    assert choose(timings) == ("channels_last", 4)  # 38 is within 5 % of 40: same throughput, lower latency


def test_a_batch_just_outside_the_tolerance_is_not_the_cap():
    timings = rates_to_seconds({"contiguous": {1: 10.0, 2: 15.0, 4: 18.9, 8: 20.0}})
    assert choose(timings) == ("contiguous", 8)  # 18.9 < 0.95 * 20
    assert choose(timings, tolerance=0.10) == ("contiguous", 4)


def test_contiguous_wins_where_it_peaks_higher_even_at_a_small_batch():
    timings = rates_to_seconds({"channels_last": {1: 8.0, 2: 10.0, 4: 12.0, 8: 13.0, 16: 13.5},
                                "contiguous": {1: 9.0, 2: 13.0, 4: 16.0, 8: 15.0, 16: 14.0}})
    assert choose(timings) == ("contiguous", 4)


def test_a_tie_goes_to_the_first_format_and_a_flat_curve_to_batch_one():
    timings = rates_to_seconds({"channels_last": {1: 10.0, 2: 10.0, 4: 10.0}, "contiguous": {1: 10.0, 2: 10.0}})
    assert choose(timings) == ("channels_last", 1)
    with pytest.raises(ValueError):
        choose({"channels_last": {}})


# --------------------------------------------------------------------------------------------------- measure


class FakeForward:
    """Seconds per forward from a table; records every call."""

    def __init__(self, seconds: dict[str, dict[int, list[float]]]) -> None:
        self.seconds, self.calls = seconds, []

    def __call__(self, fmt: str, size: int) -> float:
        self.calls.append((fmt, size))
        return self.seconds[fmt][size][min(len(self.seconds[fmt][size]) - 1,
                                           sum(call == (fmt, size) for call in self.calls) - 1)]


def test_measure_interleaves_the_formats_leaves_the_first_round_out_and_takes_medians():
    forward = FakeForward({"a": {1: [9.0, 0.1, 0.3, 0.2], 2: [9.0, 0.4, 0.4, 0.5]},
                           "b": {1: [9.0, 0.2, 0.2, 0.2], 2: [9.0, 0.3, 0.9, 0.3]}})
    timings = medians(measure_samples(forward, ("a", "b"), (1, 2), rounds=3, forward_budget_s=100,
                                      total_budget_s=1000))
    assert timings == {"a": {1: 0.2, 2: 0.4}, "b": {1: 0.2, 2: 0.3}}
    assert forward.calls == [("a", 1), ("b", 1), ("a", 2), ("b", 2)] * 4


def test_a_format_stops_growing_once_its_next_forward_would_exceed_the_budget():
    seconds = {"slow": {1: [0.3] * 4, 2: [0.6] * 4, 4: [1.2] * 4}, "fast": {1: [0.1] * 4, 2: [0.2] * 4,
                                                                         4: [0.4] * 4}}
    timings = measure_samples(FakeForward(seconds), ("slow", "fast"), (1, 2, 4), rounds=3, forward_budget_s=1.0,
                              total_budget_s=1000)
    assert set(timings["slow"]) == {1, 2} and set(timings["fast"]) == {1, 2, 4}  # 0.6 * 4 / 2 > 1.0


def test_timed_rounds_stop_at_the_total_budget_but_one_always_runs():
    seconds = {"a": {1: [1.0] * 10, 2: [2.0] * 10}}
    once = FakeForward(seconds)
    measure_samples(once, ("a",), (1, 2), rounds=3, forward_budget_s=10, total_budget_s=1.0)
    assert len(once.calls) == 2 * 2  # the untimed round and one timed round, though both are over the budget
    some = FakeForward(seconds)
    measure_samples(some, ("a",), (1, 2), rounds=5, forward_budget_s=10, total_budget_s=10.0)
    assert len(some.calls) == 2 * 3  # 3 s untimed + 3 s + 3 s = 9 s; a third round would end at 12 s


def test_spread_is_the_typical_relative_range_of_the_timed_rounds():
    steady = {"a": {1: [1.0, 1.05, 1.0], 2: [2.0, 2.0, 2.1]}, "b": {1: [1.0, 5.0, 1.0]}}  # one outlier point
    assert tuning.spread(steady) == pytest.approx(0.05)
    busy = {"a": {1: [1.0, 1.5, 1.0], 2: [2.0, 3.0, 2.2]}, "b": {1: [1.0, 1.0, 1.02]}}
    assert tuning.spread(busy) == pytest.approx(1.0 / 2.2) and tuning.spread(busy) > Settings().tune_max_spread
    assert tuning.spread({"a": {1: [1.0], 2: [3.0]}}) == 0.0  # one round: nothing to compare


# ------------------------------------------------------------------------------------------------------ plan


def test_with_nothing_set_a_cpu_service_times_both_formats_up_to_the_ceiling():
    plan = plan_for(Settings(tune="auto", channels_last=None, max_batch_size=None), "cpu")
    assert plan.timed and plan.formats == ("channels_last", "contiguous") and plan.max_batch_size is None
    assert plan.sizes == (1, 2, 4, 8, 16) and plan.sources == OPEN
    assert plan_for(Settings(tune="auto", max_batch_size=None, max_batch_ceiling=12), "cpu").sizes == (1, 2, 4, 8, 12)
    assert plan_for(Settings(tune="auto", max_batch_size=None, max_batch_ceiling=1), "cpu").sizes == (1,)


def test_settings_given_are_kept_and_what_is_left_open_is_timed():
    cap_only = plan_for(Settings(tune="auto", channels_last=None, max_batch_size=6), "cpu")
    assert cap_only.timed and cap_only.max_batch_size == 6 and cap_only.sizes == (1, 2, 4, 6)
    assert cap_only.sources == {"max_batch_size": "configured", "memory_format": "tuned"}
    format_only = plan_for(Settings(tune="auto", channels_last=False, max_batch_size=None), "cpu")
    assert format_only.timed and format_only.formats == ("contiguous",)
    both = plan_for(Settings(tune="auto", channels_last=True, max_batch_size=3), "cpu")
    assert not both.timed and both.sources == {"max_batch_size": "configured", "memory_format": "configured"}


def test_tune_off_and_cuda_keep_the_fixed_defaults():
    for settings, device, cap in ((Settings(tune="off", channels_last=None, max_batch_size=None), "cpu", 8),
                                  (Settings(tune="auto", channels_last=None, max_batch_size=None), "cuda:0", 64)):
        plan = plan_for(settings, device)
        assert not plan.timed and (plan.formats, plan.max_batch_size) == (("channels_last",), cap)
        assert plan.sources == {"max_batch_size": "default", "memory_format": "default"}


def test_the_tune_settings(monkeypatch):
    monkeypatch.delenv("MACULA_TUNE", raising=False)  # tests/conftest.py turns it off for other tests
    for name in ("MACULA_CHANNELS_LAST", "MACULA_MAX_BATCH_SIZE", "MACULA_MAX_BATCH_CEILING"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.tune, settings.channels_last, settings.max_batch_size, settings.max_batch_ceiling) == (
        "auto", None, None, 16)
    monkeypatch.setenv("MACULA_CHANNELS_LAST", "auto")
    assert Settings().channels_last is None
    monkeypatch.setenv("MACULA_CHANNELS_LAST", "false")
    assert Settings().channels_last is False
    with pytest.raises(ValueError):
        Settings(tune="sometimes")


# ------------------------------------------------------------------------------------------------------ tune


@pytest.fixture
def runner(gray_checkpoint) -> ModelRunner:
    return ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none", max_batch_size=16)


def synthetic(monkeypatch, rates: dict[str, dict[int, float]]) -> list:
    """Replace the clock: ``tuning.time_forward`` answers from ``rates`` (images/s) and records its calls."""
    calls = []

    def fake(runner, model, memory_format, pixels):
        calls.append((memory_format, len(pixels)))
        assert next(p for p in model.parameters() if p.dim() == 4).is_contiguous(
            memory_format=tuning.MEMORY_FORMATS[memory_format])  # each format times its own copy of the model
        return len(pixels) / rates[memory_format][len(pixels)]

    monkeypatch.setattr(tuning, "time_forward", fake)
    return calls


CONTIGUOUS_AT_4 = {"channels_last": {1: 80.0, 2: 100.0, 4: 120.0, 8: 130.0, 16: 135.0},  # images/s
                   "contiguous": {1: 90.0, 2: 130.0, 4: 160.0, 8: 150.0, 16: 140.0}}


def test_tune_applies_the_choice_keeps_it_and_a_second_start_reads_it(tmp_path, runner, gray_checkpoint,
                                                                       monkeypatch):
    plan = plan_for(Settings(tune="auto", channels_last=None, max_batch_size=None), "cpu")
    cache = CompileCache(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (3, *runner.input_shape), dtype=np.uint8)
    before = runner.run(pixels, attention=True)
    calls = synthetic(monkeypatch, CONTIGUOUS_AT_4)
    tune(runner, plan, cache)
    assert (runner.memory_format_name, runner.max_batch_size, runner.tuning) == ("contiguous", 4, OPEN)
    assert runner.memory_format is torch.contiguous_format
    assert {call[0] for call in calls} == {"channels_last", "contiguous"} and {call[1] for call in calls} == {
        1, 2, 4, 8, 16}
    after = runner.run(pixels, attention=True)
    for want, got in zip(before, after, strict=True):
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-5)
    kept = json.loads(cache.tuning(tune_key(runner, plan)).read_text())
    assert (kept["memory_format"], kept["max_batch_size"]) == ("contiguous", 4)

    calls.clear()
    again = ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none", max_batch_size=16)
    tune(again, plan, cache)
    assert calls == [] and (again.memory_format_name, again.max_batch_size) == ("contiguous", 4)


def test_the_kept_timings_belong_to_their_key(tmp_path, runner, monkeypatch):
    cache = CompileCache(tmp_path)
    auto = plan_for(Settings(tune="auto", channels_last=None, max_batch_size=None), "cpu")
    synthetic(monkeypatch, CONTIGUOUS_AT_4)
    tune(runner, auto, cache)
    narrower = plan_for(Settings(tune="auto", channels_last=None, max_batch_size=None, max_batch_ceiling=4), "cpu")
    assert tune_key(runner, narrower).stem != tune_key(runner, auto).stem
    assert read_timings(cache, tune_key(runner, narrower)) is None
    cache.tuning(tune_key(runner, auto)).write_text('{"seconds": {"channels_last": {"1": -1}}}')
    assert read_timings(cache, tune_key(runner, auto)) is None  # nonsense is timed again, not trusted


def test_a_cap_given_is_kept_while_the_format_is_timed_up_to_it(tmp_path, runner, monkeypatch):
    calls = synthetic(monkeypatch, CONTIGUOUS_AT_4)
    tune(runner, plan_for(Settings(tune="auto", channels_last=None, max_batch_size=2), "cpu"), CompileCache(tmp_path))
    assert {size for _, size in calls} == {1, 2}
    assert (runner.memory_format_name, runner.max_batch_size) == ("contiguous", 2)
    assert runner.tuning == {"max_batch_size": "configured", "memory_format": "tuned"}


@pytest.mark.parametrize("settings", [Settings(tune="auto", channels_last=False, max_batch_size=3),
                                      Settings(tune="off", channels_last=False, max_batch_size=3)])
def test_forced_settings_are_never_timed(tmp_path, runner, monkeypatch, settings):
    monkeypatch.setattr(tuning, "time_forward", lambda *args: pytest.fail("timed"))
    tune(runner, plan_for(settings, "cpu"), CompileCache(tmp_path))
    assert (runner.memory_format_name, runner.max_batch_size) == ("contiguous", 3)
    assert runner.tuning == {"max_batch_size": "configured", "memory_format": "configured"}
    assert list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_written_means_timing_at_every_start(tmp_path, runner, gray_checkpoint, monkeypatch,
                                                                    caplog):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    cache, plan = CompileCache(tmp_path / "cache"), Plan(("channels_last", "contiguous"), None, 4, OPEN)
    calls = synthetic(monkeypatch, CONTIGUOUS_AT_4)
    with caplog.at_level("INFO", logger="service.tuning"):
        tune(runner, plan, cache)
        first = len(calls)
        tune(ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none"), plan, cache)
    assert first and len(calls) == 2 * first
    assert "timing at every start" in caplog.text
    assert (runner.memory_format_name, runner.max_batch_size) == ("contiguous", 4)


def test_unsteady_timings_are_served_but_not_kept(tmp_path, runner, gray_checkpoint, monkeypatch, caplog):
    plan, cache = Plan(("channels_last", "contiguous"), None, 4, OPEN), CompileCache(tmp_path)
    calls = synthetic(monkeypatch, CONTIGUOUS_AT_4)
    jitter = itertools.cycle([1.0, 1.0, 1.6, 1.6])  # a busy host: each point's rounds differ by 60 %
    timed = tuning.time_forward
    monkeypatch.setattr(tuning, "time_forward", lambda *args: timed(*args) * next(jitter))
    with caplog.at_level("INFO", logger="service.tuning"):
        tune(runner, plan, cache)
        first = len(calls)
        tune(ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none"), plan, cache)
    assert first and len(calls) == 2 * first  # timed again at the second start
    assert "timings unsteady" in caplog.text and read_timings(cache, tune_key(runner, plan)) is None
    assert runner.memory_format_name in tuning.FORMATS and runner.max_batch_size in plan.sizes
    tolerant = Plan(plan.formats, None, 4, OPEN, max_spread=1.0)  # MACULA_TUNE_MAX_SPREAD=1: kept
    tune(ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none"), tolerant, cache)
    assert read_timings(cache, tune_key(runner, tolerant)) is not None


# ------------------------------------------------------------------------------------- batcher and worker


def test_each_model_gets_batches_up_to_its_own_cap():
    import asyncio

    sizes: dict[str, list[int]] = {"a": [], "b": []}

    def run_batch(model, inputs, attention):
        sizes[model].append(len(inputs))
        return [None] * len(inputs)

    batcher = Batcher(run_batch, ["a", "b"], max_size=8, max_delay=0.0, max_queue=64, timeout_s=60)
    batcher.set_max_size("a", 2)
    batcher.set_max_size("b", 3)
    with pytest.raises(ValueError):
        batcher.set_max_size("a", 0)

    async def submit() -> None:
        futures = []
        for model in ("a", "b"):  # queued before the thread starts: every batch could take all of them
            batcher.reserve(model, 7)
            futures += batcher.submit(model, [np.zeros(1)] * 7, attention=False)
        batcher.start()
        await asyncio.gather(*futures)

    asyncio.run(submit())
    batcher.stop(10)
    assert sizes == {"a": [2, 2, 2, 1], "b": [3, 3, 1]}
    assert (batcher.max_size_of("a"), batcher.max_size_of("b")) == (2, 3)


def test_a_restarted_worker_keeps_the_first_ones_choice_without_timing(gray_checkpoint, tmp_path, monkeypatch):
    from service.worker import Worker, describe, layout_for

    monkeypatch.setattr(tuning, "time_forward", lambda *args: pytest.fail("timed"))
    settings = Settings(device="cpu", amp_dtype="none", tune="auto", channels_last=None, max_batch_size=None,
                        compile_cache=tmp_path)
    chosen = {"gray": {"max_batch_size": 3, "memory_format": "contiguous", "tuning": OPEN}}
    ours, theirs = socket.socketpair()
    try:
        worker = Worker(theirs, settings, {"gray": str(gray_checkpoint)}, chosen)
        worker.load()
        runner = worker.runners["gray"]
        assert (runner.max_batch_size, runner.memory_format_name, runner.tuning) == (3, "contiguous", OPEN)
        shown = describe(runner)
        assert (shown["max_batch_size"], shown["memory_format"], shown["tuning"]) == (3, "contiguous", OPEN)
        assert layout_for(worker.runners).max_batch == 3
    finally:
        ours.close()
        theirs.close()


def test_the_ahead_of_time_build_chooses_as_the_service_does(tmp_path, gray_checkpoint, monkeypatch):
    """``python -m service.compile`` keys its forms by the tuned cap and format, so the service finds them."""
    import shutil

    from service import compile as compile_cli

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(gray_checkpoint, models / "gray.safetensors")
    calls = synthetic(monkeypatch, CONTIGUOUS_AT_4)
    built = []
    monkeypatch.setattr(compile_cli, "build", lambda runner, form, key, cache, force: built.append(key) or
                        cache.package(key, form))
    settings = Settings(model_dir=models, compile_cache=tmp_path / "cache", device="cpu", amp_dtype="none",
                        tune="auto", channels_last=None, max_batch_size=None, torch_threads=1)
    threads = torch.get_num_threads()
    try:
        assert compile_cli.build_all(settings, None, ["forward"], force=False) == 0
    finally:
        torch.set_num_threads(threads)  # build_all sets the build's thread count
    assert calls and {(key.max_batch, key.memory_format) for key in built} == {(4, "contiguous")}
    assert len(list((tmp_path / "cache").glob("*.tuning.json"))) == 1
