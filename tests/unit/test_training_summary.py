"""The start-up summary and the drop_last warning."""

from __future__ import annotations

import logging

import torch

from training.config import TrainConfig
from training.data import build_datasets
from training.distributed import DistInfo
from training.engine import make_optimizer
from training.summary import log_start, suggest_batch_size, warn_dropped
from training.trainer import build_model


def test_drop_last_warns_above_five_percent_and_suggests_a_batch_size(caplog):
    with caplog.at_level(logging.WARNING, logger="training"):
        assert warn_dropped(180, 32, drop_last=True) == 20
    assert "leaves out 20 of 180" in caplog.text and "--batch-size 30 would leave out 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training"):
        assert warn_dropped(180, 36, drop_last=True) == 0
        assert warn_dropped(190, 36, drop_last=True) == 10  # 5.3 % ...
        assert warn_dropped(200, 36, drop_last=False) == 0
        assert warn_dropped(210, 40, drop_last=True) == 10  # 4.8 %: no warning
    assert caplog.text.count("leaves out") == 1 and "leaves out 10 of 190" in caplog.text


def test_suggested_batch_size_drops_at_most_five_percent():
    for images, batch in [(180, 32), (1000, 64), (97, 16), (21, 8)]:
        better = suggest_batch_size(images, batch)
        assert better is None or (batch // 2 <= better < batch and images % better <= 0.05 * images)
    assert suggest_batch_size(180, 32) == 30


def test_start_up_summary_names_counts_device_steps_and_every_lr(tmp_path, caplog):
    from tests.unit.test_training_data import write_folder

    root = write_folder(tmp_path / "pets", classes=("cat", "dog", "fox"), per_class=3)
    config = TrainConfig(dataset=f"imagefolder:{root}", arch="resnet20", image_size=32, mean="auto",
                         limit_train=7, backbone_lr_scale=0.1)
    bundle = build_datasets(config)
    model, _ = build_model(config, bundle)
    backbone = {name for name, _ in model.named_parameters() if name.startswith("layer1")}
    optimizer = make_optimizer(model, config, backbone)
    with caplog.at_level(logging.INFO, logger="training"):
        log_start(config, DistInfo(device=torch.device("cpu")), bundle, optimizer, steps_per_epoch=3)
    text = caplog.text
    assert "3 classes (cat, dog, fox)" in text
    assert "train 7 (cat 2, dog 3, fox 2); val 9 (cat 3, dog 3, fox 3); test none" in text
    assert "mean measured on 7 training images" in text and "centre crop" in text
    assert "device cpu x 1 process(es); batch 128 per process, 3 steps per epoch, 15 epochs" in text
    for name, lr in [("head", 0.1), ("head.no_decay", 0.1), ("backbone", 0.01), ("backbone.no_decay", 0.01)]:
        assert any(f"param group {name} " in r.message and f"lr {lr:g} " in r.message for r in caplog.records), name


def test_many_classes_are_summarised_as_a_range(tmp_path, caplog):
    from tests.unit.test_training_data import write_folder

    root = write_folder(tmp_path / "many", classes=[f"c{i:02d}" for i in range(25)], per_class=1, size=(8, 8))
    bundle = build_datasets(TrainConfig(dataset=f"imagefolder:{root}"))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with caplog.at_level(logging.INFO, logger="training"):
        log_start(TrainConfig(), DistInfo(), bundle, optimizer, steps_per_epoch=1)
    assert "25 classes (c00, c01, c02, c03, c04, ...)" in caplog.text and "train 25 (1..1 per class)" in caplog.text
