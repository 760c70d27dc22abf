"""Honest confidence: a softmax temperature and a detector of unfamiliar inputs, stored in the checkpoint.

``training/calibration.py`` fits both after training; the service scores with the pure functions here. A
:class:`Calibration` travels as one JSON value in the checkpoint's metadata (``calibration``); checkpoints
without it load as before and get no familiarity fields.

* Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): served scores
  are ``softmax(logits / T)``, ``T`` fitted by minimising the validation NLL.
* The detector scores each image (higher = more like the training data). ``mahalanobis`` (Lee et al., "A
  Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018):
  minus the smallest squared Mahalanobis distance of the pooled penultimate features to a class mean, with
  one covariance shared by the classes, fitted on training images; stored as a whitening matrix ``W``
  (``WᵀW = Σ⁻¹``) and the whitened class means. ``energy`` (Liu et al., NeurIPS 2020: ``T·logsumexp(l/T)``)
  and ``max_logit`` need only the logits; they are kept for comparison (docs/results.md: on the demo model
  they rank photos *above* test canvases).
* ``threshold``: the score above which ``accept_rate`` (95 %) of the validation images lie; an image is
  ``familiar`` when its score reaches it. ``familiarity`` is the share of validation images that score no
  higher than the image (interpolated through 101 stored quantiles): 0.0 = less familiar than every
  validation image, 0.05 ≈ the threshold, 0.5 = a typical validation image.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

METHODS = ("mahalanobis", "energy", "max_logit")


def encode_array(t: Tensor) -> dict[str, Any]:
    """A float tensor as JSON: shape and base64 of its little-endian float32 bytes (exact, compact)."""
    array = t.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    return {"shape": list(array.shape), "float32_b64": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_array(d: dict[str, Any]) -> Tensor:
    array = np.frombuffer(base64.b64decode(d["float32_b64"]), dtype="<f4").reshape(d["shape"])
    return torch.from_numpy(array.astype(np.float32))


@dataclass(frozen=True)
class Detector:
    method: str
    threshold: float
    quantiles: tuple[float, ...]  # validation scores at 0, 1, ..., 100 %
    accept_rate: float = 0.95
    whitening: Tensor | None = None  # (k, D), mahalanobis only
    means: Tensor | None = None  # (classes, k) whitened class means, mahalanobis only
    info: dict[str, Any] = field(default_factory=dict)  # what it was fitted on

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"detector method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "mahalanobis" and (self.whitening is None or self.means is None):
            raise ValueError("a mahalanobis detector needs its whitening matrix and class means")
        if len(self.quantiles) < 2 or any(b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)):
            raise ValueError("detector quantiles must be at least two non-decreasing values")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "threshold": self.threshold, "quantiles": list(self.quantiles),
                             "accept_rate": self.accept_rate, "info": self.info}
        if self.whitening is not None and self.means is not None:
            d |= {"whitening": encode_array(self.whitening), "means": encode_array(self.means)}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Detector:
        arrays = {k: decode_array(d[k]) for k in ("whitening", "means") if k in d}
        return cls(method=d["method"], threshold=float(d["threshold"]), quantiles=tuple(map(float, d["quantiles"])),
                   accept_rate=float(d.get("accept_rate", 0.95)), info=dict(d.get("info", {})), **arrays)


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    detector: Detector | None = None

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "detector": self.detector.to_json() if self.detector else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        detector = d.get("detector")
        return cls(temperature=float(d.get("temperature", 1.0)),
                   detector=Detector.from_json(detector) if detector else None)


# ------------------------------------------------------------------------------------------------ scoring


def detector_scores(detector: Detector, features: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``(N,)`` float32 scores, higher = more familiar, from pooled features ``(N, D)`` and logits ``(N, K)``."""
    if detector.method == "max_logit":
        return logits.float().amax(dim=1)
    if detector.method == "energy":
        return temperature * torch.logsumexp(logits.float() / temperature, dim=1)
    whitening, means = detector.whitening.to(features.device), detector.means.to(features.device)
    z = features.float() @ whitening.T  # (N, k)
    distances = torch.cdist(z, means, compute_mode="donot_use_mm_for_euclid_dist")  # exact, not |a|²+|b|²-2ab
    return -distances.square().amin(dim=1)


def familiarity(detector: Detector, scores: Tensor) -> Tensor:
    """``(N,)`` in [0, 1]: the share of validation images scoring no higher (piecewise linear in the quantiles)."""
    levels = np.linspace(0.0, 1.0, len(detector.quantiles))
    values = np.interp(scores.detach().cpu().double().numpy(), np.asarray(detector.quantiles), levels,
                       left=0.0, right=1.0)
    return torch.from_numpy(values).float()


def is_familiar(detector: Detector, scores: Tensor) -> Tensor:
    """``(N,)`` bool: the score reaches the threshold that accepts ``accept_rate`` of validation images."""
    return scores >= detector.threshold


def probabilities(logits: Tensor, calibration: Calibration | None) -> Tensor:
    """Softmax of ``logits / T`` (``T`` = 1 without calibration), in float32."""
    temperature = calibration.temperature if calibration is not None else 1.0
    return (logits.float() / temperature).softmax(dim=1)
