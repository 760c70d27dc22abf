"""Temperature, unfamiliar-input detector: fitting, scoring, and their round trip through the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import CheckpointError, load_checkpoint
from models.familiarity import Calibration, Detector, detector_scores, familiarity, is_familiar, probabilities
from tests.calibrated import make_calibrated_checkpoint, normalise, shapes
from training.calibration import SHRINKAGE, Outputs, fit_detector, fit_mahalanobis, fit_temperature


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    return make_calibrated_checkpoint(tmp_path_factory.mktemp("calibrated") / "shapes.safetensors")


def test_fit_temperature_recovers_a_known_overconfidence() -> None:
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g)[:, 0]
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3.0, rel=0.08)
    assert fit_temperature(true_logits / 2, labels) == pytest.approx(0.5, rel=0.08)


def gaussian_outputs(n: int, seed: int, shift: float = 0.0) -> Outputs:
    """Two classes of 8-d features with a shared, strongly anisotropic covariance."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    scale = torch.tensor([5.0, 3, 1, 1, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)
    features = torch.randn(n, 8, generator=g, dtype=torch.float64) * scale + labels[:, None] * 4.0 + shift
    return Outputs(features, torch.zeros(n, 2, dtype=torch.float64), labels)


def test_mahalanobis_whitens_the_shared_covariance_and_accepts_95_percent_of_validation() -> None:
    fit, val = gaussian_outputs(20000, 0), gaussian_outputs(2000, 1)
    whitening, means = fit_mahalanobis(fit.features, fit.labels, 2)
    centred = fit.features - fit.features.new_tensor(4.0) * fit.labels[:, None]
    covariance = torch.cov((centred.float() @ whitening.T).T)
    variances = torch.linalg.eigvalsh(torch.cov(centred.T)).flip(0)  # what the fit saw, descending
    shrunk = (variances / (variances + SHRINKAGE * variances.mean())).float()  # 1 without shrinkage
    torch.testing.assert_close(covariance, torch.diag(shrunk), atol=0.03, rtol=0)
    assert shrunk.min() < 0.5  # the shrinkage matters for the smallest direction, and the test sees it
    detector = fit_detector("mahalanobis", fit, val, num_classes=2)
    accepted = is_familiar(detector, detector_scores(detector, val.features, val.logits)).double().mean().item()
    assert accepted == pytest.approx(0.95, abs=0.002)
    # a shift along the lowest-variance direction is far in Mahalanobis terms, though tiny in Euclidean ones
    odd = gaussian_outputs(2000, 2)
    odd.features[:, 7] += 0.5
    assert is_familiar(detector, detector_scores(detector, odd.features, odd.logits)).double().mean() < 0.05


def test_familiarity_is_the_validation_cdf() -> None:
    detector = Detector("max_logit", threshold=1.0, quantiles=tuple(np.linspace(0.0, 20.0, 101)))
    scores = torch.tensor([-5.0, 0.0, 1.0, 10.0, 20.0, 99.0])
    torch.testing.assert_close(familiarity(detector, scores), torch.tensor([0.0, 0.0, 0.05, 0.5, 1.0, 1.0]))
    assert is_familiar(detector, scores).tolist() == [False, False, True, True, True, True]


def test_detector_refuses_what_it_cannot_score() -> None:
    with pytest.raises(ValueError, match="whitening"):
        Detector("mahalanobis", threshold=0.0, quantiles=(0.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        Detector("knn", threshold=0.0, quantiles=(0.0, 1.0))
    with pytest.raises(ValueError, match="temperature"):
        Calibration(temperature=0.0)


def test_temperature_and_detector_round_trip_through_the_checkpoint(calibrated: Path) -> None:
    model, meta = load_checkpoint(calibrated)
    calibration = meta.calibration
    assert calibration is not None and calibration.temperature > 0
    detector = calibration.detector
    assert detector.method == "mahalanobis" and detector.accept_rate == 0.95
    assert detector.whitening.shape == (64, 64) and detector.means.shape == (2, 64)
    assert len(detector.quantiles) == 101 and detector.quantiles[5] == pytest.approx(detector.threshold)
    again = Calibration.from_json(json.loads(json.dumps(calibration.to_json())))
    assert again.temperature == calibration.temperature and again.detector.quantiles == detector.quantiles
    assert torch.equal(again.detector.whitening, detector.whitening)
    assert torch.equal(again.detector.means, detector.means)
    logits = torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(probabilities(logits, calibration), (logits / calibration.temperature).softmax(1))


def test_checkpoints_without_calibration_load_and_broken_ones_are_refused(calibrated: Path, tmp_path: Path) -> None:
    with safe_open(str(calibrated), framework="pt") as f:
        raw, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={k: v for k, v in raw.items() if k != "calibration"})
    assert load_checkpoint(old)[1].calibration is None
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata={**raw, "calibration": json.dumps({"temperature": -1})})
    with pytest.raises(CheckpointError, match="malformed metadata"):
        load_checkpoint(broken)


def test_familiar_flag_separates_an_image_like_the_training_data_from_noise(calibrated: Path) -> None:
    model, meta = load_checkpoint(calibrated)
    detector = meta.calibration.detector
    images, _ = shapes(20, seed=99)  # unseen draws of the training distribution
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (20, 24, 24), generator=g, dtype=torch.uint8)
    with torch.inference_mode():
        flags, values = {}, {}
        for name, batch in (("shapes", images), ("noise", noise)):
            x = normalise(batch)
            features = model.forward_features(x)
            scores = detector_scores(detector, features, model.fc(features), meta.calibration.temperature)
            flags[name], values[name] = is_familiar(detector, scores), familiarity(detector, scores)
    assert flags["shapes"].double().mean() >= 0.8 and not flags["noise"].any()
    assert values["noise"].max() < values["shapes"].median()


def test_forward_features_then_fc_is_the_forward() -> None:
    from models import create_model

    for attention in (None, "bam", "cbam"):
        model = create_model("resnet20", attention=attention, num_classes=10).eval()
        x = torch.randn(3, 3, 32, 32)
        with torch.inference_mode():
            features = model.forward_features(x)
            assert features.shape == (3, 64)
            assert torch.equal(model.fc(features), model(x))
