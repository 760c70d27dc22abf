"""Write the example images in examples/: one cluttered-MNIST test canvas per digit, and one photo.

    .venv/bin/python examples/make_examples.py      # from the repository root; rewrites the files below

The demo model (``model_store/demo.safetensors``, ``make demo-model``) reads 48x48 grayscale canvases that hold
one digit among fragments of other digits (``training/cluttered.py``, ``docs/results.md``). Plain MNIST digits
are not what it learnt: it gets about half of them right. So the digits here are canvases like the ones it
was trained on: ``digit-0.png`` ... ``digit-9.png`` are the first canvas of each digit in the fixed test split,
which no training run sees, drawn with the canvas size and clutter recorded in the demo checkpoint.

``cat.jpg`` is Chelsea the cat from scikit-image's sample data, scaled down: a real photo, which the demo
model has no class for; it shows what the service answers for an image unlike its training data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from skimage import data

from models import load_checkpoint
from training.config import TrainConfig
from training.data import cluttered_mnist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def write_digits(out: Path, model: Path) -> list[Path]:
    """``out/digit-N.png``: the first test-split canvas of each digit N, as the demo model was trained."""
    training = load_checkpoint(model)[1].training
    config = TrainConfig(canvas_size=training["canvas_size"], clutter=training["clutter"])
    test = cluttered_mnist("cluttered-mnist", config).test
    first = {}
    for index, label in enumerate(test.labels.tolist()):
        first.setdefault(label, index)
    paths = []
    for label, index in sorted(first.items()):
        paths.append(out / f"digit-{label}.png")
        Image.fromarray(test.draw(index).image).save(paths[-1], optimize=True)
    return paths


def write_photo(out: Path) -> Path:
    """``out/cat.jpg``: scikit-image's ``chelsea`` (451x300), scaled to 192x128."""
    path = out / "cat.jpg"
    Image.fromarray(data.chelsea()).resize((192, 128), Image.Resampling.LANCZOS).save(path, quality=85)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write to (default: examples/)")
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "demo.safetensors",
                        help="the checkpoint whose training canvases to draw (default: the demo model)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in [*write_digits(args.out, args.model), write_photo(args.out)]:
        print(f"{path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
