"""Fit a checkpoint's honest-confidence part after training: a softmax temperature and an unfamiliar-input detector.

    python -m training.calibration runs/demo/model.safetensors     # (re)fit an existing checkpoint in place

* Temperature: minimises the NLL of ``softmax(logits / T)`` on the validation split (Guo et al. 2017).
* Detector (``models.familiarity``): ``mahalanobis`` by default, chosen by measurement on the demo model
  (``python -m training.ood --compare``, docs/results.md). Its class means and shared covariance come from
  the training images seen through the evaluation transform (no augmentation; at most ``MAX_FIT_IMAGES``);
  its threshold from the validation images, so the 95 % acceptance is measured on images it was not fitted
  to.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from models import load_checkpoint, save_checkpoint
from models.familiarity import Calibration, Detector, detector_scores

MAX_FIT_IMAGES = 20_000
MAX_DIMS = 512  # wider features are projected onto their top principal directions first
SHRINKAGE = 1e-3  # covariance += SHRINKAGE · mean eigenvalue · I
ACCEPT_RATE = 0.95


@dataclass
class Outputs:
    features: Tensor  # (N, D) float64
    logits: Tensor  # (N, K) float64
    labels: Tensor  # (N,)


@torch.no_grad()
def collect(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu",
            batch_size: int = 256) -> Outputs:
    """Pooled features, logits and labels of every sample of ``dataset`` (model in eval mode)."""
    model.eval()
    features, labels = [], []
    for images, targets, *_ in DataLoader(dataset, batch_size=batch_size, num_workers=0):
        features.append(model.forward_features(images.to(device)).double().cpu())
        labels.append(torch.as_tensor(targets))
    feats = torch.cat(features)
    fc = model.fc
    logits = feats @ fc.weight.detach().double().cpu().T + fc.bias.detach().double().cpu()
    return Outputs(feats, logits, torch.cat(labels))


def with_eval_transform(dataset: Dataset, transform) -> Dataset:
    """``dataset`` (through any Subsets) with its transform replaced by ``transform``; the original is untouched.

    A dataset re-drawn per epoch (cluttered-mnist) is seen at epoch 0, so the fit depends on the weights only,
    not on the epoch training stopped at (``python -m training.calibration`` then fits the same detector).
    """
    if isinstance(dataset, Subset):
        return Subset(with_eval_transform(dataset.dataset, transform), dataset.indices)
    view = copy.copy(dataset)
    view.transform = transform
    if hasattr(view, "set_epoch"):
        view.set_epoch(0)
    return view


# ------------------------------------------------------------------------------------------- fitting


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The ``T`` minimising the mean NLL of ``softmax(logits / T)`` (LBFGS on ``log T``, float64)."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(-5, 5).exp())


def fit_mahalanobis(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Whitening ``W`` (``WᵀW = Σ⁻¹`` of the shrunk within-class covariance) and the whitened class means
    (of the classes present in ``labels``)."""
    features = features.double()
    present = [c for c in range(num_classes) if (labels == c).any()]
    means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    for c in present:
        means[c] = features[labels == c].mean(0)
    centred = features - means[labels]
    covariance = centred.T @ centred / max(len(features) - len(present), 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0)[:MAX_DIMS], eigenvectors.flip(1)[:, :MAX_DIMS]
    eigenvalues = eigenvalues.clamp(min=0) + SHRINKAGE * eigenvalues.clamp(min=0).mean().clamp(min=1e-12)
    whitening = eigenvectors.T / eigenvalues.sqrt()[:, None]  # (k, D)
    whitened_means = means[present] @ whitening.T  # a class without training images has no mean
    return whitening.float(), whitened_means.float()


def fit_detector(method: str, fit: Outputs, val: Outputs, *, num_classes: int, temperature: float = 1.0,
                 accept_rate: float = ACCEPT_RATE) -> Detector:
    """A detector of ``method`` whose threshold accepts ``accept_rate`` of the validation images."""
    arrays = dict(zip(("whitening", "means"), fit_mahalanobis(fit.features, fit.labels, num_classes),
                      strict=True)) if method == "mahalanobis" else {}
    provisional = Detector(method, threshold=0.0, quantiles=(0.0, 0.0), **arrays)
    scores = detector_scores(provisional, val.features, val.logits, temperature).double().numpy()
    quantiles = tuple(float(q) for q in np.quantile(scores, np.linspace(0, 1, 101)))
    threshold = float(np.quantile(scores, 1 - accept_rate))
    info = {"fit_images": len(fit.labels), "val_images": len(val.labels)}
    return Detector(method, threshold=threshold, quantiles=quantiles, accept_rate=accept_rate, info=info, **arrays)


def calibrate(model: nn.Module, train: Dataset, val: Dataset, *, transform, num_classes: int,
              device: torch.device | str = "cpu", method: str = "mahalanobis") -> Calibration:
    """Temperature from ``val``; detector fitted on ``train`` (through ``transform``) and thresholded on ``val``."""
    from .data import limit

    fit_set = limit(with_eval_transform(train, transform), MAX_FIT_IMAGES)
    fit, held = collect(model, fit_set, device=device), collect(model, val, device=device)
    temperature = fit_temperature(held.logits, held.labels)
    detector = fit_detector(method, fit, held, num_classes=num_classes, temperature=temperature)
    return Calibration(temperature=temperature, detector=detector)


# ----------------------------------------------------------------------------------------------- CLI


def calibrate_checkpoint(path: Path, *, method: str = "mahalanobis", device: str = "cpu") -> Calibration:
    """Fit ``path``'s calibration on the data its training summary names and write it into the file."""
    from .config import TrainConfig
    from .data import build_datasets

    model, meta = load_checkpoint(path, map_location=device)
    t = meta.training
    config = TrainConfig(dataset=t["dataset"], canvas_size=t.get("canvas_size", 64), clutter=t.get("clutter", 6),
                         seed=t.get("seed", 0), image_size=meta.preprocessing.input_size[0])
    bundle = build_datasets(config)
    calibration = calibrate(model, bundle.train, bundle.val, transform=meta.preprocessing.eval_transform(),
                            num_classes=meta.num_classes, device=device, method=method)
    save_checkpoint(model, path, class_names=meta.class_names, preprocessing=meta.preprocessing,
                    training=meta.training, calibration=calibration, **meta.extra)
    return calibration


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--method", choices=["mahalanobis", "energy", "max_logit"], default="mahalanobis")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    calibration = calibrate_checkpoint(args.checkpoint, method=args.method, device=args.device)
    detector = calibration.detector
    print(f"{args.checkpoint}: temperature {calibration.temperature:.3f}, {detector.method} detector, "
          f"threshold {detector.threshold:.4g} ({detector.accept_rate:.0%} of validation images accepted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
