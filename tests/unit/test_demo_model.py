"""The committed demo model (model_store/demo.safetensors): accurate, calibrated, and honest about a photo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from models import load_checkpoint
from models.familiarity import detector_scores, familiarity, is_familiar
from training.config import TrainConfig
from training.data import cluttered_mnist

DEMO = Path(__file__).resolve().parents[2] / "model_store" / "demo.safetensors"


@pytest.fixture(scope="module")
def demo():
    return load_checkpoint(DEMO)


def familiar(model, meta, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    detector = meta.calibration.detector
    with torch.inference_mode():
        features = model.forward_features(x)
        scores = detector_scores(detector, features, model.fc(features), meta.calibration.temperature)
    return is_familiar(detector, scores), familiarity(detector, scores)


def test_demo_meets_the_accuracy_bar_and_carries_a_detector(demo):
    _, meta = demo
    assert meta.training["test_acc"] >= 0.985 and meta.training["epoch"] == meta.training["epochs"] == 15
    assert meta.calibration is not None and meta.calibration.detector.method == "mahalanobis"
    assert meta.calibration.detector.info == {"fit_images": 4000, "val_images": 500}


def test_demo_flags_a_photo_and_accepts_test_canvases(demo):
    from skimage import data as skimage_data  # the test extra

    model, meta = demo
    transform = meta.preprocessing.eval_transform()
    photo = transform(Image.fromarray(skimage_data.astronaut()))[None]
    test = cluttered_mnist("", TrainConfig(canvas_size=48, clutter=4)).test
    canvases = torch.stack([test[i][0] for i in range(100)])
    photo_flag, photo_familiarity = familiar(model, meta, photo)
    canvas_flags, _ = familiar(model, meta, canvases)
    assert not photo_flag.item() and photo_familiarity.item() == 0.0
    assert canvas_flags.double().mean() >= 0.9
