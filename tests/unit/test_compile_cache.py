"""The compiled serving form without compiling anything: the cache key, the cache files (locks, failure markers,
quarantine), the ``auto`` verdict, and the fallbacks to eager (corrupt package, failed build, no compiler, a
verdict against compiling), each with its metric. tests/integration/test_compile.py compiles for real."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from service import compiled, compiling
from service.compiled import CompileCache, CompiledModel, CompileKey, build, compile_key, device_signature
from service.compiling import Compiler, decide
from service.inference import ModelRunner
from service.metrics import Metrics
from service.settings import Settings

DEMO = Path(__file__).parents[2] / "model_store" / "demo.safetensors"
KEY = CompileKey(version="0123456789ab", scheme="features-v1", torch="2.14.1", device="cpu:x86_64:AVX2:avx2",
                 dtype="float32", memory_format="channels_last", max_batch=8, threads=2)


@pytest.fixture
def runner(gray_checkpoint) -> ModelRunner:
    return ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none", max_batch_size=4)


def run_now(fn, *args) -> Future:
    """A stand-in for the batcher's ``call``: run on this thread."""
    future: Future = Future()
    future.set_result(fn(*args))
    return future


def make_compiler(tmp_path: Path, runner: ModelRunner, mode: str = "on",
                  command=None) -> tuple[Compiler, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = Settings(model_dir=runner.path.parent, compile=mode, compile_cache=tmp_path / "cache", amp_dtype="none")
    compiler = Compiler(settings, Metrics(registry), command=command)
    compiler.bind([runner], run_now, threads=1)
    return compiler, registry


def sample(registry: CollectorRegistry, name: str, **labels) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def key_of(compiler: Compiler, runner: ModelRunner) -> CompileKey:
    return compile_key(runner, runner.max_batch_size, compiler.threads)


# ------------------------------------------------------------------------------------------------------ the key


@pytest.mark.parametrize("field, value", [("version", "ba9876543210"), ("scheme", "features-v2"), ("torch", "2.15.0"),
                                          ("dtype", "bfloat16"),
                                          ("device", "cpu:x86_64:AVX512:avx2,avx512,avx512_bf16"),
                                          ("memory_format", "contiguous"), ("max_batch", 16), ("threads", 4)])
def test_every_part_of_the_key_changes_the_cache_file(field, value):
    other = dataclasses.replace(KEY, **{field: value})
    assert other.digest != KEY.digest
    cache = CompileCache(Path("/cache"))
    assert cache.package(other, "forward") != cache.package(KEY, "forward")
    assert cache.package(KEY, "forward").name == f"0123456789ab-{KEY.digest}.forward.pt2"
    assert dataclasses.replace(KEY).digest == KEY.digest  # and it is a pure function of the fields


def test_the_runner_key_follows_its_checkpoint_precision_and_layout(gray_checkpoint, rgb_checkpoint):
    plain = ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none")
    key = compile_key(plain, 8, 2)
    assert (key.version, key.dtype, key.memory_format, key.threads) == (plain.meta.version, "float32",
                                                                         "channels_last", 2)
    assert key.torch == torch.__version__ and key.device == device_signature(torch.device("cpu"))
    bf16 = ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="bfloat16", native_cpu_bf16=True)
    contiguous = ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none", channels_last=False)
    other = ModelRunner("rgb", rgb_checkpoint, device="cpu", amp_dtype="none")
    digests = {compile_key(r, 8, 2).digest for r in (plain, bf16, contiguous, other)}
    assert len(digests) == 4
    assert compile_key(bf16, 8, 2).dtype == "bfloat16"


def test_the_cpu_signature_names_the_isa_without_needing_a_compiler():
    kind, machine, isa, extensions = device_signature(torch.device("cpu")).split(":")
    assert kind == "cpu" and machine and isa == torch.backends.cpu.get_cpu_capability()
    assert ("avx512_bf16" in extensions.split(",")) == torch.cpu._is_avx512_bf16_supported()


def test_the_compile_settings(monkeypatch):
    monkeypatch.delenv("MACULA_COMPILE", raising=False)  # tests/conftest.py turns it off for other tests
    settings = Settings(model_dir="store")
    assert settings.compile == "auto"
    assert settings.compile_cache_dir() == Path("store/.compile-cache")
    assert Settings(compile="off", compile_cache="/var/cache/macula").compile_cache_dir() == Path("/var/cache/macula")
    with pytest.raises(ValidationError):
        Settings(compile="sometimes")


def test_auto_keeps_the_compiled_form_when_it_is_no_slower():
    assert decide(0.10, 0.08, 8)["pays"] and decide(0.10, 0.10, 8)["pays"]
    assert not decide(0.10, 0.11, 8)["pays"]
    assert decide(0.2, 0.1, 4) == {"pays": True, "eager_s": 0.2, "compiled_s": 0.1, "batch": 4}


# ------------------------------------------------------------------------------------------------- the files


def test_a_failed_build_leaves_a_marker_and_no_partial_file(tmp_path, runner, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor fell over")

    monkeypatch.setattr(compiled, "export_form", broken)
    cache = CompileCache(tmp_path)
    with pytest.raises(RuntimeError):
        build(runner, "forward", KEY, cache)
    assert cache.failure(KEY, "forward").read_text().startswith("RuntimeError: inductor fell over")
    assert not cache.package(KEY, "forward").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".tmp", ".pt2")]


def test_replicas_sharing_a_cache_build_each_form_once(tmp_path, runner, monkeypatch):
    """Two builders at once (two replicas): the second waits on the lock, then finds the first one's file."""
    import torch._inductor

    calls = []

    def fake_compile(program, *, package_path, inductor_configs):
        calls.append(inductor_configs)
        time.sleep(0.3)
        Path(package_path).write_bytes(b"package")
        return package_path

    monkeypatch.setattr(compiled, "export_form", lambda *args: None)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    cache = CompileCache(tmp_path)
    killed = tmp_path / f".{cache.package(KEY, 'forward').stem}.99999.tmp.pt2"  # left by a builder killed mid-way
    killed.write_bytes(b"half a package")
    results = []
    threads = [threading.Thread(target=lambda: results.append(build(runner, "forward", KEY, cache)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [cache.package(KEY, "forward")] * 2
    assert calls == [{"freezing": True, "cpp.threads": 2}]  # once, with the key's thread count
    assert cache.package(KEY, "forward").read_bytes() == b"package"
    assert not killed.exists()


def test_notes_in_an_unwritable_cache_are_skipped_not_raised(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    cache = CompileCache(tmp_path / "cache")
    assert not cache.write_atomic(cache.decision(KEY), "{}")
    assert cache.read_decision(KEY) is None
    assert CompileCache(tmp_path / "ok").write_atomic(CompileCache(tmp_path / "ok").decision(KEY), '{"pays": true}')


@pytest.mark.parametrize("text", ["{", "[]", '{"pays": "yes", "eager_s": 1, "compiled_s": 1, "batch": 8}',
                                  '{"pays": true, "eager_s": 1, "batch": 8}'])
def test_a_mangled_verdict_is_measured_again(tmp_path, text):
    cache = CompileCache(tmp_path)
    cache.write_atomic(cache.decision(KEY), text)
    assert cache.read_decision(KEY) is None
    cache.write_atomic(cache.decision(KEY), '{"pays": false, "eager_s": 0.1, "compiled_s": 0.2, "batch": 8}')
    assert cache.read_decision(KEY)["pays"] is False


def test_without_packages_the_compiled_model_is_the_eager_one(runner):
    x = runner._to_device(np.zeros((2, *runner.input_shape), np.uint8))
    wrapper = CompiledModel(runner.model, ["layer1.0.cbam"])
    with torch.inference_mode():
        assert torch.equal(wrapper(x), runner.model(x))
        assert list(wrapper.forward_with_attention(x)[1]) == list(runner.model.forward_with_attention(x)[1])


# -------------------------------------------------------------------------------------------- falling back


def test_a_corrupt_package_falls_back_to_eager_is_set_aside_and_rebuilt(tmp_path, runner):
    compiler, registry = make_compiler(tmp_path, runner)
    path = compiler.cache.package(key_of(compiler, runner), "forward")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not really a package")
    expected = runner.run(np.zeros((1, *runner.input_shape), np.uint8))[0].scores
    compiler.load_cached()
    assert runner.compiled is None and runner.serving_form == "eager"
    assert sample(registry, "macula_compile_failures_total", model="gray", stage="load") == 1
    assert sample(registry, "macula_model_compiled", model="gray") == 0
    assert not path.exists() and path.with_suffix(".bad").exists()
    assert compiler.pending == [runner]  # built again in the background
    np.testing.assert_array_equal(runner.run(np.zeros((1, *runner.input_shape), np.uint8))[0].scores, expected)


def test_a_build_that_fails_leaves_the_model_eager_with_the_metric(tmp_path, runner):
    command = [sys.executable, "-c", "import sys; print('inductor: something broke'); sys.exit(3)"]
    compiler, registry = make_compiler(tmp_path, runner, command=lambda r, form: command)
    compiler.load_cached()
    assert compiler.pending == [runner]
    compiler.start_background()
    compiler._thread.join(60)
    assert runner.serving_form == "eager"
    assert sample(registry, "macula_compile_failures_total", model="gray", stage="compile") == 1


@pytest.mark.parametrize("mode, counted", [("on", 1), ("auto", 0)])
def test_no_compiler_means_eager_and_in_on_mode_a_counted_failure(tmp_path, runner, monkeypatch, mode, counted):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    started = []
    compiler, registry = make_compiler(tmp_path, runner, mode=mode,
                                       command=lambda r, form: started.append(form) or ["false"])
    compiler.load_cached()
    compiler.start_background()
    compiler._thread.join(60)
    assert started == [] and runner.serving_form == "eager"
    assert sample(registry, "macula_compile_failures_total", model="gray", stage="compile") == counted


def test_a_read_only_cache_means_eager(tmp_path, runner):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    compiler, registry = make_compiler(tmp_path, runner, command=lambda r, form: pytest.fail("built"))
    compiler.load_cached()
    compiler.start_background()
    compiler._thread.join(60)
    assert runner.serving_form == "eager"
    assert sample(registry, "macula_compile_failures_total", model="gray", stage="compile") == 1


def test_an_earlier_failure_is_not_retried_until_its_marker_goes(tmp_path, runner):
    compiler, registry = make_compiler(tmp_path, runner, command=lambda r, form: pytest.fail("rebuilt"))
    key = key_of(compiler, runner)
    compiler.cache.write_atomic(compiler.cache.failure(key, "forward"), "RuntimeError: earlier\n")
    compiler.load_cached()
    assert compiler.pending == [] and runner.serving_form == "eager"


def test_auto_serves_eager_without_loading_where_compiling_did_not_pay(tmp_path, runner):
    compiler, registry = make_compiler(tmp_path, runner, mode="auto", command=lambda r, form: pytest.fail("built"))
    key = key_of(compiler, runner)
    compiler.cache.write_atomic(compiler.cache.decision(key), '{"pays": false, "eager_s": 0.01, "compiled_s": 0.02, '
                                '"batch": 4}')
    package = compiler.cache.package(key, "forward")
    package.write_bytes(b"would fail to load")
    compiler.load_cached()
    assert compiler.pending == [] and runner.serving_form == "eager"
    assert sample(registry, "macula_compile_failures_total", model="gray", stage="load") == 0
    assert package.exists()  # never opened
    assert sample(registry, "macula_compile_speedup_ratio", model="gray") == pytest.approx(0.5)


def test_off_touches_nothing(tmp_path, runner):
    compiler, registry = make_compiler(tmp_path, runner, mode="off", command=lambda r, form: pytest.fail("built"))
    compiler.load_cached()
    compiler.start_background()
    assert compiler._thread is None and not (tmp_path / "cache").exists()
    assert sample(registry, "macula_model_compiled", model="gray") == 0


def test_the_background_build_runs_the_cli_with_this_services_key_settings(tmp_path, runner):
    compiler, _ = make_compiler(tmp_path, runner)
    command = compiler.build_command(runner, "attention")
    assert command[:3] == [sys.executable, "-m", "service.compile"]
    assert command[-1] == "--channels-last"
    flags = dict(zip(command[3:-1:2], command[4:-1:2], strict=True))
    assert flags["--models"] == "gray" and flags["--forms"] == "attention"
    assert flags["--max-batch-size"] == "4" and flags["--torch-threads"] == "1" and flags["--amp-dtype"] == "none"
    assert flags["--cache"] == str(tmp_path / "cache") and int(flags["--nice"]) > 0


# ----------------------------------------------------------------------------- the swap, with stand-in packages


class EagerPackage:
    """Stands in for a loaded package: the runner's model in the package's calling convention (float32)."""

    def __init__(self, runner: ModelRunner, form: str, scale: float = 1.0) -> None:
        self.features, self.form, self.scale = runner.model.forward_features, form, scale

    def __call__(self, x):
        if self.form == "forward":
            return self.features(x) * self.scale
        maps = {}
        features = self.features(x, maps) * self.scale
        return (features, *(m.spatial for m in maps.values()), *(m.channel for m in maps.values()))


def with_packages(monkeypatch, compiler: Compiler, runner: ModelRunner, scale: float = 1.0) -> None:
    """Both forms 'in the cache', loading as :class:`EagerPackage`."""
    key = key_of(compiler, runner)
    for form in compiled.FORMS:
        compiler.cache.package(key, form).parent.mkdir(parents=True, exist_ok=True)
        compiler.cache.package(key, form).write_bytes(form.encode())
    monkeypatch.setattr(compiled, "load_package",
                        lambda path, device: EagerPackage(runner, path.read_text(), scale))


def test_forms_that_match_eager_are_swapped_in(tmp_path, runner, monkeypatch):
    compiler, registry = make_compiler(tmp_path, runner)
    with_packages(monkeypatch, compiler, runner)
    pixels = compiled.example_pixels(runner, 3)
    want = runner.run(pixels, attention=True)
    compiler.load_cached()
    assert runner.serving_form == "compiled" and set(runner.compiled.forms) == {"forward", "attention"}
    assert sample(registry, "macula_model_compiled", model="gray") == 1
    got = runner.run(pixels, attention=True)
    assert compiled._compare(want, got, 1e-6) is None
    assert list(got[0].masks) == list(want[0].masks)


def test_a_form_that_does_not_match_eager_is_refused_and_marked(tmp_path, runner, monkeypatch):
    compiler, registry = make_compiler(tmp_path, runner)
    with_packages(monkeypatch, compiler, runner, scale=3.0)  # logits off by a factor: different softmax scores
    compiler.load_cached()
    assert runner.compiled is None and compiler.pending == []
    assert sample(registry, "macula_compile_failures_total", model="gray", stage="verify") == 1
    marker = compiler.cache.failure(key_of(compiler, runner), "forward")
    assert marker.read_text().startswith("does not match eager: batch 1: scores differ")


def test_auto_times_the_forms_once_and_keeps_the_verdict(tmp_path, runner, monkeypatch):
    compiler, registry = make_compiler(tmp_path, runner, mode="auto")
    with_packages(monkeypatch, compiler, runner)
    timed = []
    real = compiled.time_forward
    monkeypatch.setattr(compiled, "time_forward", lambda *args: timed.append(args[1]) or real(*args))
    compiler.load_cached()
    verdict = compiler.cache.read_decision(key_of(compiler, runner))
    assert len(timed) == 2 * (compiling.TIMING_ROUNDS + 1)
    assert timed[:2] == [None, timed[1]] and timed[1] is not None  # eager and compiled alternate
    assert set(verdict) == {"pays", "eager_s", "compiled_s", "batch"} and verdict["batch"] == 4
    assert runner.serving_form == ("compiled" if verdict["pays"] else "eager")
    assert sample(registry, "macula_compile_speedup_ratio", model="gray") == pytest.approx(
        verdict["eager_s"] / verdict["compiled_s"])
    runner.compiled, timed[:] = None, []
    compiler.load_cached()
    assert timed == [] and runner.serving_form == ("compiled" if verdict["pays"] else "eager")


def test_a_checkpoint_with_a_detector_is_served_compiled_with_the_same_familiarity(tmp_path, monkeypatch):
    """The compiled forms give the pooled features, which the unfamiliar-input detector needs too (the demo model
    carries one)."""
    runner = ModelRunner("demo", DEMO, device="cpu", amp_dtype="none")
    assert runner.detector is not None
    pixels = compiled.example_pixels(runner, 3)
    eager = {attention: runner.run(pixels, attention=attention) for attention in (False, True)}
    compiler, _ = make_compiler(tmp_path, runner)
    with_packages(monkeypatch, compiler, runner)
    compiler.load_cached()
    assert set(runner.compiled.forms) == {"forward", "attention"}
    calls = []
    monkeypatch.setattr(runner.model, "forward_features", lambda *a: calls.append(a) or pytest.fail("eager"))
    for attention, want in eager.items():
        got = runner.run(pixels, attention=attention)
        assert compiled._compare(want, got, 1e-6) is None
        assert [g.familiar for g in got] == [w.familiar for w in want]
        assert [g.familiarity for g in got] == pytest.approx([w.familiarity for w in want], abs=1e-5)
