"""Datasets by name: image folders, CIFAR errors, the MNIST sample; clear errors for bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import Preprocessing
from training.config import TrainConfig
from training.data import DatasetError, build_datasets


def write_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_imagefolder_reads_classes_and_uses_the_checkpoint_eval_transform(tmp_path):
    root = write_folder(tmp_path / "pets")
    bundle = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32))
    assert bundle.class_names == ["cat", "dog"] and len(bundle.train) == 6 and len(bundle.val) == 6
    assert bundle.preprocessing == Preprocessing(input_size=(32, 32), resize_mode="center_crop", resize_size=37)
    image, label = bundle.val[4]
    expected = bundle.preprocessing.eval_transform()(Image.open(root / "val" / "dog" / "1.png"))
    assert label == 1 and torch.equal(image, expected)
    train_image, _ = bundle.train[0]
    assert train_image.shape == (3, 32, 32) and train_image.dtype == torch.float32


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset folder"):
        build_datasets(TrainConfig(dataset=f"imagefolder:{tmp_path / 'nope'}"))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train"):
        build_datasets(TrainConfig(dataset=f"imagefolder:{tmp_path / 'only_train'}"))


def test_empty_class_is_named(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty_class"):
        build_datasets(TrainConfig(dataset=f"imagefolder:{root}"))


def test_unreadable_image_is_named(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "val" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bundle = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32))
    broken = [i for i, (path, _) in enumerate(bundle.val.samples) if path.endswith("broken.png")][0]
    with pytest.raises(DatasetError, match="broken.png: unreadable image"):
        bundle.val[broken]


def test_unknown_dataset_and_missing_cifar_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        build_datasets(TrainConfig(dataset="imagenet"))
    with pytest.raises(DatasetError, match="--download"):
        build_datasets(TrainConfig(dataset=f"cifar10:{tmp_path}"))


def test_mnist5k_and_cluttered_mnist_splits_and_preprocessing():
    mnist = build_datasets(TrainConfig(dataset="mnist5k"))
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (4000, 500, 500)
    assert mnist.val[0][0].shape == (1, 28, 28) and mnist.in_chans == 1
    cluttered = build_datasets(TrainConfig(dataset="cluttered-mnist", canvas_size=48, limit_val=100))
    assert cluttered.preprocessing == Preprocessing(input_size=(48, 48), resize_mode="stretch", resize_size=48,
                                                    mean=(0.1307,), std=(0.3081,), color="L")
    assert len(cluttered.val) == 100 and len(cluttered.test) == 100
    image, label = cluttered.test[0]
    canvas = cluttered.test.dataset.draw(0).image
    assert torch.equal(image, cluttered.preprocessing.eval_transform()(Image.fromarray(canvas)))
    assert image.shape == (1, 48, 48) and 0 <= label < 10


def test_cluttered_training_tensors_match_the_eval_transform():
    bundle = build_datasets(TrainConfig(dataset="cluttered-mnist", canvas_size=48))
    transform = bundle.preprocessing.eval_transform()
    for i in (0, 7, 123):
        image, label = bundle.train[i]
        expected = transform(Image.fromarray(bundle.train.draw(i).image))
        assert torch.allclose(image, expected, atol=1e-6) and label == bundle.train.draw(i).label
