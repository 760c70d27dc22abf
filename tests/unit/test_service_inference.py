"""The model runner: same scores as the plain model, masks = round(255 x spatial), batching-invariant results,
CUDA out-of-memory split and retry, output count checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import load_checkpoint
from service.inference import ModelRunner


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(6, 1, 32, 32)).astype(np.float32)


def test_scores_and_masks_match_the_model(gray_checkpoint, inputs):
    runner = ModelRunner("gray", gray_checkpoint, device="cpu", channels_last=True)
    results = runner.run(inputs, attention=True)
    model, _ = load_checkpoint(gray_checkpoint)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(torch.from_numpy(inputs))
    np.testing.assert_allclose(np.stack([r.scores for r in results]), logits.softmax(1).numpy(), atol=1e-5)
    for i, result in enumerate(results):
        assert list(result.masks) == list(maps)
        for name, amap in maps.items():
            expected = (amap.spatial[i, 0] * 255).round().numpy()
            assert result.masks[name].dtype == np.uint8
            assert np.abs(result.masks[name].astype(np.float64) - expected).max() <= 1


def test_results_do_not_depend_on_the_batch(gray_checkpoint, inputs):
    runner = ModelRunner("gray", gray_checkpoint, device="cpu")
    together = np.stack([r.scores for r in runner.run(inputs)])
    alone = np.stack([runner.run(inputs[i:i + 1])[0].scores for i in range(len(inputs))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert all(r.masks is None for r in runner.run(inputs[:2], attention=False))


def test_out_of_memory_splits_the_batch_and_retries(gray_checkpoint, inputs, monkeypatch):
    runner = ModelRunner("gray", gray_checkpoint, device="cpu")
    expected = [r.scores for r in runner.run(inputs)]
    real_forward, sizes = runner._forward, []

    def forward(x, attention):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x, attention)

    monkeypatch.setattr(runner, "_forward", forward)
    results = runner.run(inputs)
    assert sizes == [6, 3, 1, 2, 3, 1, 2]
    np.testing.assert_allclose(np.stack([r.scores for r in results]), np.stack(expected), atol=1e-5)
    with pytest.raises(torch.OutOfMemoryError):
        monkeypatch.setattr(runner, "_forward", lambda x, a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
        runner.run(inputs[:1])


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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_channels_last_agrees_with_cpu(rgb_checkpoint):
    x = np.random.default_rng(1).normal(size=(8, 3, 32, 32)).astype(np.float32)
    cpu = ModelRunner("rgb", rgb_checkpoint, device="cpu").run(x, attention=True)
    gpu = ModelRunner("rgb", rgb_checkpoint, device="cuda", amp_dtype="bfloat16").run(x, attention=True)
    for c, g in zip(cpu, gpu, strict=True):
        assert c.scores.argmax() == g.scores.argmax()
        np.testing.assert_allclose(c.scores, g.scores, atol=0.05)
        assert {k: v.shape for k, v in c.masks.items()} == {k: v.shape for k, v in g.masks.items()}
