"""Datasets by name: image folders, CIFAR errors, the MNIST sample; clear errors for bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import Preprocessing
from training.config import ConfigError, TrainConfig
from training.data import DatasetError, build_datasets, load_image
from training.stats import class_counts


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


# ------------------------------------------------------------------ users' folders: mean/std, resize, augment


def write_solid_folder(root: Path) -> Path:
    """Two classes of solid-colour images of different sizes: R and G are 0 or 1, B is 0.2 or 0.6."""
    colours = {"a": [(255, 0, 51), (0, 255, 153)], "b": [(0, 255, 51), (255, 0, 153)]}
    for split in ("train", "val"):
        for name, pair in colours.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, colour in enumerate(pair):
                Image.new("RGB", (50 + 10 * i, 40), colour).save(root / split / name / f"{i}.png")
    return root


def test_auto_mean_and_std_are_measured_on_the_training_images(tmp_path):
    root = write_solid_folder(tmp_path / "solid")
    bundle = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32, mean="auto", std="auto"))
    pre = bundle.preprocessing
    assert pre.mean == pytest.approx((0.5, 0.5, 0.4), abs=1e-5)
    assert pre.std == pytest.approx((0.5, 0.5, 0.2), abs=1e-5)
    assert bundle.options["normalisation"] == {"auto": ["mean", "std"], "images": 4}
    # both the training and the evaluation transform normalise with what was measured
    image, _ = bundle.val[0]  # a/0.png: (1.0, 0.0, 0.2)
    assert image[:, 5, 5].tolist() == pytest.approx([1.0, -1.0, -1.0], abs=1e-4)
    train_image, _ = bundle.train[0]
    assert train_image[:, 5, 5].tolist() == pytest.approx([1.0, -1.0, -1.0], abs=1e-4)


def test_auto_mean_with_a_given_std_and_the_limit(tmp_path):
    root = write_solid_folder(tmp_path / "solid")
    config = TrainConfig(dataset=f"imagefolder:{root}", image_size=32, mean="auto", std=(0.25, 0.25, 0.25),
                         limit_train=2)
    bundle = build_datasets(config)
    assert len(bundle.train) == 2 and bundle.options["normalisation"] == {"auto": ["mean"], "images": 2}
    assert bundle.preprocessing.std == (0.25, 0.25, 0.25)
    # the limit keeps a/0 and b/1: (255, 0, 51) and (255, 0, 153)
    assert bundle.preprocessing.mean == pytest.approx((1.0, 0.0, 0.4), abs=1e-5)


def test_flat_images_cannot_give_an_auto_std(tmp_path):
    root = write_folder(tmp_path / "pets")
    for path in (root / "train").rglob("*.png"):
        Image.new("RGB", (40, 30), (10, 20, 30)).save(path)
    with pytest.raises(DatasetError, match="flat"):
        build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32, std="auto"))


def test_given_mean_and_std_need_one_value_per_channel(tmp_path):
    root = write_folder(tmp_path / "pets")
    with pytest.raises(ConfigError, match="--mean needs 3 value"):
        build_datasets(TrainConfig(dataset=f"imagefolder:{root}", mean=(0.5,)))
    gray = build_datasets(TrainConfig(dataset="mnist5k", mean=(0.5,), std=(0.2,), limit_train=10, limit_val=10))
    assert gray.preprocessing.mean == (0.5,) and gray.preprocessing.std == (0.2,)
    with pytest.raises(ConfigError, match="--std must be 'auto' or"):
        TrainConfig(std="median").validate()


def test_resize_mode_stretch_for_folders_only(tmp_path):
    root = write_folder(tmp_path / "pets", size=(60, 20))
    bundle = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32, resize_mode="stretch"))
    assert bundle.preprocessing.resize_mode == "stretch"
    image, _ = bundle.val[0]
    expected = bundle.preprocessing.eval_transform()(Image.open(root / "val" / "cat" / "0.png"))
    assert image.shape == (3, 32, 32) and torch.equal(image, expected)
    with pytest.raises(ConfigError, match="imagefolder only"):
        build_datasets(TrainConfig(dataset="mnist5k", resize_mode="stretch"))


def test_augment_levels(tmp_path):
    root = write_folder(tmp_path / "pets", size=(60, 20))
    plain = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32, augment="none"))
    image, _ = plain.train[0]  # no augmentation: exactly the evaluation transform
    expected = plain.preprocessing.eval_transform()(Image.open(root / "train" / "cat" / "0.png"))
    assert torch.equal(image, expected)
    strong = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32, augment="strong"))
    steps = [type(t).__name__ for t in strong.train.transform.transforms]
    assert "TrivialAugmentWide" in steps and "RandomResizedCrop" in steps
    light = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32, augment="light"))
    crop = next(t for t in light.train.transform.transforms if type(t).__name__ == "RandomResizedCrop")
    assert crop.scale == (0.35, 1.0)
    with pytest.raises(ConfigError, match="not available for mnist5k"):
        build_datasets(TrainConfig(dataset="mnist5k", augment="standard"))


def test_images_are_upright_by_their_exif_orientation(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=1, size=(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees, as the service decodes it
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "val" / "cat" / "0.jpg", exif=exif)
    (root / "val" / "cat" / "0.png").unlink()
    assert load_image(str(root / "val" / "cat" / "0.jpg")).size == (30, 40)


def test_a_test_folder_becomes_the_test_split(tmp_path):
    root = write_folder(tmp_path / "pets")
    assert build_datasets(TrainConfig(dataset=f"imagefolder:{root}")).test is None
    for name in ("cat", "dog"):
        (root / "test" / name).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(root / "test" / name / "x.png")
    bundle = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", image_size=32))
    assert len(bundle.test) == 2 and bundle.test[1][1] == 1
    (root / "test" / "cow").mkdir()
    Image.new("RGB", (40, 30)).save(root / "test" / "cow" / "x.png")
    with pytest.raises(DatasetError, match="differ from test classes"):
        build_datasets(TrainConfig(dataset=f"imagefolder:{root}"))


def test_class_counts_without_loading_images(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=4)
    bundle = build_datasets(TrainConfig(dataset=f"imagefolder:{root}", limit_train=6))
    assert class_counts(bundle.train, 2) == [3, 3]
    assert class_counts(build_datasets(TrainConfig(dataset="mnist5k")).val, 10) == \
        np.bincount([label for _, label in build_datasets(TrainConfig(dataset="mnist5k")).val], minlength=10).tolist()
