"""bf16 as served, in the benchmarks: the peers' Classifier can run it, and bench.precision compares it with float32."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.precision import compare
from bench.servers.common import Classifier
from models import load_checkpoint
from models.fusion import count_batchnorms


def test_classifier_runs_the_served_bf16_model(gray_checkpoint):
    exact, served = Classifier(gray_checkpoint), Classifier(gray_checkpoint, precision="bfloat16")
    assert count_batchnorms(exact.model) > 0 and count_batchnorms(served.model) == 0
    x = torch.randn(4, 1, 32, 32)
    p32, p16 = exact.probabilities(x), served.probabilities(x)
    assert p16.dtype == torch.float32 and torch.allclose(p16.sum(1), torch.ones(4))
    assert (p32 - p16).abs().max() < 0.02


def test_compare_counts_top1_of_both_precisions(gray_checkpoint):
    model, _ = load_checkpoint(gray_checkpoint)
    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 32, 32), torch.randint(0, 10, (12,))
    with torch.no_grad():
        expected_top1 = int((model.eval()(images).argmax(1) == labels).sum()) / len(labels)
    result = compare(model, DataLoader(TensorDataset(images, labels), batch_size=5))
    assert result["images"] == 12 and result["top1_float32"] == expected_top1
    assert 0.5 <= result["top1_agreement"] <= 1.0 and 0 <= result["max_softmax_delta"] < 0.05
    assert 0 <= result["mask_delta_levels"]["mean"] <= result["mask_delta_levels"]["max"] <= 255
