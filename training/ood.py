"""Inputs a cluttered-mnist model never saw, and how well a checkpoint's detector flags them.

    python -m training.ood model_store/demo.safetensors            # the stored detector
    python -m training.ood model_store/demo.safetensors --compare  # every method, fitted as training does

Reports the AUROC between the held-out test canvases (familiar) and photos + textures (unfamiliar), and,
at the stored threshold, the share of photos, textures and test canvases flagged; also, outside the goal,
the same for the test canvases with their digit blanked (clutter only: no digit to name). Needs scikit-image
(the ``test`` extra) for the photos and scikit-learn (installed with mlxtend) for the AUROC.

The photos are scikit-image's bundled ones (``skimage.data``, no download), each used whole and as random
crops (a user may send any part of a photo), plus the 200 25×25 face photos of ``skimage.data.lfw_subset``.
The textures are drawn from a fixed seed: noise, smooth noise, gratings, checkerboards, gradients, blobs,
flat greys, salt and pepper, and scikit-image's drawn images (checkerboard, colour wheel, logo, phantom).
Every image goes through the checkpoint's own ``preprocessing.eval_transform()`` (greyscale, stretch to the
input size), the pipeline the service matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import load_checkpoint
from models.familiarity import METHODS, Detector, detector_scores, is_familiar

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "clock", "page", "text", "brick",
          "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "cell", "microaneurysms")
DRAWN = ("checkerboard", "colorwheel", "logo", "shepp_logan_phantom", "horse")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Any skimage array (bool, float in [0, 1], uint8, RGBA) as uint8 greyscale or RGB."""
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / max(hi - lo, 1e-12) * 255
    image = np.asarray(image).round().clip(0, 255).astype(np.uint8)
    return image[..., :3] if image.ndim == 3 else image


def skimage_image(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return to_uint8(image[0] if isinstance(image, tuple) else image)


def random_crops(image: np.ndarray, n: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``n`` square crops of 30–100 % of the shorter side, anywhere in the image."""
    h, w = image.shape[:2]
    for _ in range(n):
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        yield image[y:y + side, x:x + side]


def photos(crops_per_photo: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Each bundled photo whole and as random crops, then the 200 LFW faces."""
    import skimage.data

    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for name in PHOTOS:
        image = skimage_image(name)
        out += [image, *random_crops(image, crops_per_photo, rng)]
    out += [to_uint8(face) for face in skimage.data.lfw_subset()]
    return out


def textures(n_per_kind: int = 20, size: int = 96, seed: int = 0) -> list[np.ndarray]:
    """Synthetic images, ``n_per_kind`` of each kind, plus scikit-image's drawn images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    kinds: list[Callable[[], np.ndarray]] = [
        lambda: rng.uniform(0, 1, (size, size)),
        lambda: np.clip(rng.normal(rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3), (size, size)), 0, 1),
        lambda: smooth_noise(rng, size),
        lambda: 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 12) * (np.cos(a := rng.uniform(0, np.pi)) * xx
                                                                       + np.sin(a) * yy)),
        lambda: ((xx * (k := int(rng.integers(2, 12)))).astype(int) + (yy * k).astype(int)) % 2 * 1.0,
        lambda: (np.cos(a := rng.uniform(0, 2 * np.pi)) * xx + np.sin(a) * yy + 1) / 3,
        lambda: np.full((size, size), rng.uniform(0, 1)),
        lambda: (rng.uniform(0, 1, (size, size)) < rng.uniform(0.02, 0.3)) * 1.0,
        lambda: blobs(rng, size),
    ]
    out = [to_uint8(kind()) for kind in kinds for _ in range(n_per_kind)]
    return out + [skimage_image(name) for name in DRAWN]


def smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(0, 1, (int(rng.integers(3, 12)),) * 2)
    return np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)) / 255


def blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    image = np.zeros((size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(1, 8))):
        cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(3, size / 4)]
        image = np.maximum(image, ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * rng.uniform(0.3, 1.0))
    return image


def clutter_only(dataset) -> list[np.ndarray]:
    """Each canvas of a ClutteredMNIST split with its digit blanked: fragments only (reported, not in the goal)."""
    out = []
    for index in range(len(dataset)):
        canvas = dataset.draw(index)
        image = canvas.image.copy()
        x0, y0, x1, y1 = canvas.box
        image[y0:y1, x0:x1] = 0
        out.append(image)
    return out


def prepare(images: list[np.ndarray], transform: Callable) -> torch.Tensor:
    """uint8 arrays → one batch through ``transform`` (the checkpoint's ``eval_transform()``)."""
    return torch.stack([transform(Image.fromarray(image)) for image in images])


# ------------------------------------------------------------------------------------------- measuring


def auroc(familiar: np.ndarray, unfamiliar: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(familiar)), np.zeros(len(unfamiliar))]
    return float(roc_auc_score(labels, np.r_[familiar, unfamiliar]))


def measure(detector: Detector, outputs: dict, temperature: float) -> dict[str, float]:
    """AUROC (test vs photos + textures, and vs photos alone) and the share of each set flagged."""
    scores = {name: detector_scores(detector, o.features, o.logits, temperature).double().numpy()
              for name, o in outputs.items()}
    flagged = {f"flagged_{name}": float(1 - is_familiar(detector, torch.from_numpy(s)).double().mean())
               for name, s in scores.items() if name != "val"}
    return {"auroc": auroc(scores["test"], np.r_[scores["photos"], scores["textures"]]),
            "auroc_photos": auroc(scores["test"], scores["photos"]),
            "auroc_textures": auroc(scores["test"], scores["textures"]),
            "auroc_clutter_only": auroc(scores["test"], scores["clutter_only"]), **flagged}


def collect_sets(path: Path) -> tuple[dict, object, object]:
    """Model outputs on train (for fitting), val, test, photos and textures; plus the model and its metadata."""
    from .calibration import collect, with_eval_transform
    from .config import TrainConfig
    from .data import cluttered_mnist

    model, meta = load_checkpoint(path)
    transform = meta.preprocessing.eval_transform()
    t = meta.training
    bundle = cluttered_mnist("", TrainConfig(canvas_size=t.get("canvas_size", 64), clutter=t.get("clutter", 6),
                                             seed=t.get("seed", 0)))
    sets = {"train": with_eval_transform(bundle.train, transform), "val": bundle.val, "test": bundle.test}
    outputs = {name: collect(model, ds) for name, ds in sets.items()}
    for name, images in (("photos", photos()), ("textures", textures()), ("clutter_only", clutter_only(bundle.test))):
        x = prepare(images, transform)
        outputs[name] = collect(model, torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long)))
    return outputs, model, meta


def compare(outputs: dict, num_classes: int) -> dict[str, dict[str, float]]:
    """Every detector method fitted as ``training.calibration`` does, measured on the same sets."""
    from .calibration import fit_detector, fit_temperature

    temperature = fit_temperature(outputs["val"].logits, outputs["val"].labels)
    return {method: measure(fit_detector(method, outputs["train"], outputs["val"], num_classes=num_classes,
                                         temperature=temperature), outputs, temperature) for method in METHODS}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ood", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a cluttered-mnist checkpoint")
    p.add_argument("--compare", action="store_true", help="fit and measure every detector method")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    outputs, _, meta = collect_sets(args.checkpoint)
    report = {"checkpoint": str(args.checkpoint), "version": meta.version,
              "images": {name: len(o.labels) for name, o in outputs.items()}}
    if args.compare:
        report["methods"] = compare(outputs, meta.num_classes)
    if meta.calibration is not None and meta.calibration.detector is not None:
        report["temperature"] = meta.calibration.temperature
        report["stored"] = {"method": meta.calibration.detector.method,
                            **measure(meta.calibration.detector, outputs, meta.calibration.temperature)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
