"""The model runner: same scores as the plain model (BN folded, uint8 pixels normalised per batch), masks =
round(255 x spatial), batching-invariant results, the CPU precision rule, CUDA out-of-memory split (by the batcher),
output count checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import fold_batchnorm, load_checkpoint
from service.codec import normalise
from service.inference import ModelRunner, autocast_dtype


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    """Six grey 32x32 images as the codec hands them over: uint8 (N, H, W, C)."""
    return np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 1), dtype=np.uint8)


@pytest.mark.parametrize("channels_last", [True, False])
def test_scores_and_masks_match_the_model(gray_checkpoint, inputs, channels_last):
    runner = ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype="none", channels_last=channels_last)
    results = runner.run(inputs, attention=True)
    model, meta = load_checkpoint(gray_checkpoint)
    x = torch.from_numpy(np.stack([normalise(p, meta.preprocessing) for p in inputs]))
    with torch.no_grad():
        logits, maps = model.eval().forward_with_attention(x)
    np.testing.assert_allclose(np.stack([r.scores for r in results]), logits.softmax(1).numpy(), atol=1e-5)
    for i, result in enumerate(results):
        assert list(result.masks) == list(maps)
        for name, amap in maps.items():
            expected = (amap.spatial[i, 0] * 255).round().numpy()
            assert result.masks[name].dtype == np.uint8
            assert np.abs(result.masks[name].astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize("amp_dtype", ["none", "bfloat16"])
def test_results_do_not_depend_on_the_batch(gray_checkpoint, inputs, amp_dtype):
    runner = ModelRunner("gray", gray_checkpoint, device="cpu", amp_dtype=amp_dtype)
    together = np.stack([r.scores for r in runner.run(inputs)])
    alone = np.stack([runner.run(inputs[i:i + 1])[0].scores for i in range(len(inputs))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert all(r.masks is None for r in runner.run(inputs[:2], attention=False))


def test_out_of_memory_is_split_by_the_batcher_like_any_failing_batch(gray_checkpoint, inputs, monkeypatch):
    import asyncio

    from service.batching import Batcher

    runner = ModelRunner("gray", gray_checkpoint, device="cpu")
    expected = [r.scores for r in runner.run(inputs)]
    real_forward, sizes = runner._forward, []

    def forward(x, attention):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x, attention)

    monkeypatch.setattr(runner, "_forward", forward)
    with pytest.raises(torch.OutOfMemoryError):  # the runner itself does not split: it re-raises
        runner.run(inputs)
    sizes.clear()
    batcher = Batcher(lambda model, x, attention: runner.run(x, attention), ["gray"], max_size=8, max_delay=0.0,
                      max_queue=16, timeout_s=30)

    async def all_at_once():
        blocked = batcher.call(lambda: None)
        batcher.reserve("gray", len(inputs))
        futures = batcher.submit("gray", list(inputs), attention=False)
        await asyncio.wrap_future(blocked)
        return await asyncio.gather(*futures)

    batcher.start()
    try:
        results = asyncio.run(all_at_once())
    finally:
        assert batcher.stop(10)
    assert sizes[0] == 6 and sizes == [6, 3, 1, 2, 3, 1, 2]
    np.testing.assert_allclose(np.stack([r.scores for r in results]), np.stack(expected), atol=1e-5)


def test_output_count_is_checked(gray_checkpoint, inputs, monkeypatch):
    runner = ModelRunner("gray", gray_checkpoint, device="cpu")
    monkeypatch.setattr(runner.model, "forward", lambda x: torch.zeros(len(x) - 1, 10))
    with pytest.raises(RuntimeError, match="outputs for"):
        runner.run(inputs)


def test_warm_up_runs_every_batch_size(rgb_checkpoint, monkeypatch):
    runner = ModelRunner("rgb", rgb_checkpoint, device="cpu")
    sizes = []
    real = runner._forward
    monkeypatch.setattr(runner, "_forward", lambda x, a: sizes.append(len(x)) or real(x, a))
    runner.warm_up(4)
    assert sizes == [1, 2, 3, 4]


def test_cpu_autocasts_to_bf16_only_with_native_support():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, "bfloat16", native_cpu_bf16=True) is torch.bfloat16
    assert autocast_dtype(cpu, "bfloat16", native_cpu_bf16=False) is None
    assert autocast_dtype(cpu, "float16", native_cpu_bf16=True) is None  # no fast fp16 CPU kernels
    assert autocast_dtype(cpu, "none", native_cpu_bf16=True) is None
    assert autocast_dtype(cuda, "float16") is torch.float16 and autocast_dtype(cuda, "none") is None


def test_bf16_autocast_on_cpu_stays_close_to_float32(rgb_checkpoint):
    """bf16 is forced here (it runs, if slowly, on any CPU): same top-1, scores and masks within bf16 rounding."""
    x = np.random.default_rng(2).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    exact = ModelRunner("rgb", rgb_checkpoint, device="cpu", amp_dtype="none")
    fast = ModelRunner("rgb", rgb_checkpoint, device="cpu", amp_dtype="bfloat16", native_cpu_bf16=True)
    assert (exact.precision, fast.precision) == ("float32", "bfloat16")
    for e, f in zip(exact.run(x, attention=True), fast.run(x, attention=True), strict=True):
        assert e.scores.argmax() == f.scores.argmax()
        np.testing.assert_allclose(f.scores, e.scores, atol=0.02)
        for name, mask in e.masks.items():
            diff = np.abs(mask.astype(int) - f.masks[name].astype(int))
            assert diff.mean() < 1.5 and diff.max() <= 16  # of 255 levels


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_channels_last_agrees_with_cpu(rgb_checkpoint):
    x = np.random.default_rng(1).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    cpu = ModelRunner("rgb", rgb_checkpoint, device="cpu", amp_dtype="none").run(x, attention=True)
    gpu = ModelRunner("rgb", rgb_checkpoint, device="cuda", amp_dtype="bfloat16").run(x, attention=True)
    for c, g in zip(cpu, gpu, strict=True):
        assert c.scores.argmax() == g.scores.argmax()
        np.testing.assert_allclose(c.scores, g.scores, atol=0.05)
        assert {k: v.shape for k, v in c.masks.items()} == {k: v.shape for k, v in g.masks.items()}


@pytest.mark.parametrize("checkpoint", ["gray_checkpoint", "rgb_checkpoint"])  # CBAM and BAM
def test_bf16_weights_cast_at_load_give_the_autocast_outputs_bit_for_bit(request, checkpoint):
    """On a bf16 CPU the runner casts the weights once instead of letting autocast cast them every forward."""
    path = request.getfixturevalue(checkpoint)
    runner = ModelRunner("m", path, device="cpu", amp_dtype="bfloat16", native_cpu_bf16=True)
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    reference = fold_batchnorm(load_checkpoint(path)[0].eval())  # float32 weights, cast by autocast
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    pixels = np.random.default_rng(3).integers(0, 256, size=(4, *runner.input_shape), dtype=np.uint8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, maps = reference.forward_with_attention(runner._to_device(pixels))
    served = runner.run(pixels, attention=True)
    np.testing.assert_array_equal(np.stack([r.scores for r in served]), logits.float().softmax(1).numpy())
    for name, m in maps.items():
        expected = (m.spatial.float() * 255).round().to(torch.uint8)[:, 0].numpy()
        np.testing.assert_array_equal(np.stack([r.masks[name] for r in served]), expected)
