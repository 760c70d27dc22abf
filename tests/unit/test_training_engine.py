"""The loop's parts: schedule, optimiser groups, one epoch, evaluation numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.config import ConfigError, TrainConfig
from training.engine import autocast, evaluate, group_lrs, lr_factor, make_optimizer, make_scheduler, train_one_epoch
from training.trainer import epochs_since_best


def test_warmup_then_cosine_and_step_schedules():
    cosine = [lr_factor(s, total=100, warmup=10, schedule="cosine", milestones=()) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[10] == pytest.approx(1.0) and cosine[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:], strict=False)) and cosine[-1] < 0.01
    step = [lr_factor(s, total=100, warmup=0, schedule="step", milestones=(0.5, 0.75)) for s in (0, 49, 50, 74, 75)]
    assert step == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_scheduler_runs_per_step_and_scales_every_group():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    config = TrainConfig(lr=0.2, epochs=2, schedule="cosine", backbone_lr_scale=0.1)
    optimizer = make_optimizer(model, config, backbone={"0.weight", "0.bias"})
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=5)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.02, 0.02, 0.2])
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    half = 0.5 * (1 + math.cos(math.pi * 0.5))
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.02 * half, 0.02 * half, 0.2 * half])


def test_no_weight_decay_on_biases_and_norms_momentum_as_the_papers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    optimizer = make_optimizer(model, TrainConfig())
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 1e-4
    assert decay[id(model[0].bias)] == decay[id(model[1].weight)] == decay[id(model[1].bias)] == 0.0
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)


def separable_loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    torch.manual_seed(0)
    x = torch.randn(n, 2)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch_size, shuffle=True)


def test_train_one_epoch_learns_and_reports():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    loader = separable_loader()
    config = TrainConfig(lr=0.5, epochs=5, clip_grad=1.0, label_smoothing=0.1, log_interval=0)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, len(loader))
    first = train_one_epoch(model, loader, optimizer, scheduler, config, epoch=1, device=torch.device("cpu"))
    for epoch in range(2, 6):
        last = train_one_epoch(model, loader, optimizer, scheduler, config, epoch=epoch, device=torch.device("cpu"))
    assert set(first) == {"loss", "acc", "lr", "lrs", "img_per_s", "seconds"}
    assert first["lrs"] == {"head": first["lr"]}
    assert last["loss"] < first["loss"] and last["acc"] > 0.9 and last["lr"] < 1e-3 and last["img_per_s"] > 0


def test_evaluate_counts_top1_top5_and_per_class():
    class Fixed(nn.Module):  # ranks the class in the input's first column first, then 0, 1, 2, ...
        def forward(self, x):
            return nn.functional.one_hot(x[:, 0].long(), 6).float() * 10 - torch.arange(6) * 0.1

    predicted = torch.tensor([0, 1, 2, 3, 0, 0])
    targets = torch.tensor([0, 1, 2, 3, 4, 5])  # classes 4 and 5 wrong
    loader = DataLoader(TensorDataset(torch.stack([predicted.float(), torch.zeros(6)], 1), targets), batch_size=4)
    result = evaluate(Fixed(), loader, TrainConfig(log_interval=0), device=torch.device("cpu"), num_classes=6)
    assert result["acc"] == pytest.approx(4 / 6) and result["n"] == 6
    assert result["per_class"] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert result["top5"] == pytest.approx(5 / 6)  # 5 ranks last for the last image
    assert "confusion" not in result
    matrix = evaluate(Fixed(), loader, TrainConfig(log_interval=0), device=torch.device("cpu"), num_classes=6,
                      confusion=True)["confusion"]
    expected = [[0] * 6 for _ in range(6)]
    for true, guess in zip(targets.tolist(), predicted.tolist(), strict=True):
        expected[true][guess] += 1
    assert matrix == expected  # rows: true class (4 and 5 taken for 0), columns: predicted


def test_amp_bf16_on_cpu_and_fp16_refused_on_cpu():
    with autocast(TrainConfig(amp="bf16"), torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        autocast(TrainConfig(amp="fp16"), torch.device("cpu"))


def test_parameter_groups_are_named_and_both_lrs_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    config = TrainConfig(lr=0.2, backbone_lr_scale=0.1)
    optimizer = make_optimizer(model, config, backbone={"0.weight", "0.bias", "1.weight", "1.bias"})
    assert sorted(g["name"] for g in optimizer.param_groups) == ["backbone", "backbone.no_decay", "head",
                                                                 "head.no_decay"]
    assert group_lrs(optimizer) == pytest.approx({"head": 0.2, "backbone": 0.02})
    x = torch.randn(8, 4)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)
    scheduler = make_scheduler(optimizer, TrainConfig(lr=0.2, epochs=2), steps_per_epoch=len(loader))
    result = train_one_epoch(model, loader, optimizer, scheduler, TrainConfig(log_interval=0), epoch=1,
                             device=torch.device("cpu"))
    assert result["lrs"] == pytest.approx({"head": 0.1, "backbone": 0.01})  # half-way down the cosine
    assert result["lr"] == pytest.approx(0.1)


def test_patience_counts_epochs_since_the_first_best():
    rows = [{"epoch": e, "val_acc": acc} for e, acc in enumerate([0.2, 0.5, 0.4, 0.5, 0.3], start=1)]
    assert [epochs_since_best(rows[:n]) for n in range(6)] == [0, 0, 0, 1, 2, 3]


def test_unknown_arch_and_bad_options_are_refused_by_the_config():
    with pytest.raises(ConfigError, match="unknown network 'resnet19'"):
        TrainConfig(arch="resnet19").validate()
    with pytest.raises(ConfigError, match="--patience must be >= 1"):
        TrainConfig(patience=0).validate()
    with pytest.raises(ConfigError, match="--resize-mode"):
        TrainConfig(resize_mode="pad").validate()
    TrainConfig(arch="resnet50", mean="auto", std=(0.2, 0.2, 0.2), patience=3, augment="strong").validate()
