"""``python -m training.evaluate CKPT``: accuracy, confusion and, where boxes exist, where the masks point.

    python -m training.evaluate model_store/demo.safetensors                  # data from the checkpoint
    python -m training.evaluate runs/x/model.safetensors --dataset imagefolder:data/pets --json -
    python -m training.evaluate CKPT --dataset imagefolder:photos --boxes photos/boxes.csv --confusion-png c.png

Reports top-1/top-5, per-class accuracy and the confusion matrix of one split: ``--split`` if given
(refused when the dataset has no such split), else ``test`` where there is one, else ``val``. An
``imagefolder`` needs no ``train/``: ``PATH/test``, ``PATH/val`` or a flat folder of class folders
(split ``all``) is scored, labelled by the checkpoint's classes. Where boxes exist (cluttered-mnist's
digit boxes, or ``--boxes`` for a folder, see ``training.boxes``) it also reports, per attention
module, the localisation score (share of the spatial mask's mass inside the box, see
``training.localisation``) next to the box-area share, which is what a uniform mask scores, and the
pointing-game hit rate (mask peak inside the box). Images go through the checkpoint's own
``preprocessing.eval_transform()``, exactly as the service does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from models import CheckpointError, load_checkpoint

from .boxes import BoxedImages, read_boxes
from .cli import user_message
from .config import TrainConfig
from .data import DatasetError, build_datasets, cluttered_mnist, limit
from .engine import evaluate
from .folders import evaluation_folder
from .localisation import localisation

MAX_PRINTED_CLASSES = 20


def data_config(meta_training: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    """The dataset to score on: ``--dataset`` if given, else the one the checkpoint was trained on."""
    dataset = args.dataset or meta_training.get("dataset")
    if not dataset:
        raise DatasetError("the checkpoint does not name its dataset: pass --dataset")
    return TrainConfig(dataset=dataset, canvas_size=args.canvas_size or meta_training.get("canvas_size", 64),
                       clutter=args.clutter if args.clutter is not None else meta_training.get("clutter", 6),
                       download=args.download, batch_size=args.batch_size, workers=args.workers)


def eval_split(config: TrainConfig, split: str | None, transform, with_boxes: bool,
               class_names: list[str] | None = None) -> tuple[list[str], str, Dataset]:
    """``(class names, split name, dataset)`` for scoring: ``split``, or by default test, else val.

    A split the dataset does not have is refused. ``imagefolder`` folders are read on their own (no
    ``train/`` needed) and labelled by ``class_names`` (the checkpoint's) when given.
    """
    name, _, path = config.dataset.partition(":")
    if name == "imagefolder":
        chosen, folder = evaluation_folder(path, split, class_names, transform)
        return list(folder.classes), chosen, folder
    bundle = cluttered_mnist("", config, return_box=True) if with_boxes else build_datasets(config)
    chosen = split or ("test" if bundle.test is not None else "val")
    dataset = getattr(bundle, chosen)
    if dataset is None:
        raise DatasetError(f"{config.dataset} has no {chosen} split apart from val; use --split val")
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    base.transform = transform  # the checkpoint's own eval pipeline, as served
    return bundle.class_names, chosen, dataset


def boxed_images(args: argparse.Namespace, dataset: Dataset, config: TrainConfig, pre) -> BoxedImages | None:
    """The images of an imagefolder split that ``--boxes`` gives boxes for."""
    if args.boxes is None:
        return None
    if not config.dataset.startswith("imagefolder:"):
        raise DatasetError("--boxes is for imagefolder datasets (cluttered-mnist brings its own boxes)")
    folder, indices = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else \
        (dataset, list(range(len(dataset))))
    boxed = BoxedImages(folder, indices, read_boxes(args.boxes), pre)
    if len(boxed) == 0:
        raise DatasetError(f"{args.boxes}: no box matches an image of {folder.root} inside the model's input "
                           f"(paths are relative to that folder, e.g. {Path(folder.samples[0][0]).parent.name}/...)")
    return boxed


def localisation_report(model, loader, device) -> dict[str, Any]:
    loc = localisation(model, loader, device=device)
    return {"box_share": loc.pop("box_share"),
            "pointing": {k.split(":", 1)[1]: v for k, v in loc.items() if k.startswith("pointing:")},
            "localisation": {k: v for k, v in loc.items() if not k.startswith("pointing:")}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(args.checkpoint, map_location=device)
    config = data_config(meta.training, args)
    with_boxes = config.dataset == "cluttered-mnist"
    class_names, split, dataset = eval_split(config, args.split, meta.preprocessing.eval_transform(), with_boxes,
                                             meta.class_names)
    if class_names != meta.class_names:
        raise DatasetError(f"dataset classes {class_names[:5]}... differ from the checkpoint's "
                           f"{meta.class_names[:5]}...")
    dataset = limit(dataset, args.limit)
    boxed = boxed_images(args, dataset, config, meta.preprocessing)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    scores = evaluate(model, loader, config, device=device, num_classes=len(class_names), is_main=False,
                      confusion=True)
    report = {"checkpoint": str(args.checkpoint), "version": meta.version, "dataset": config.dataset, "split": split,
              "images": scores["n"], "top1": scores["acc"], "top5": scores["top5"],
              "per_class": per_class(class_names, scores),
              "confusion": {"labels": class_names, "matrix": scores["confusion"]}}
    if with_boxes:
        report.update(localisation_report(model, loader, device))
    elif boxed is not None:
        boxed_loader = DataLoader(boxed, batch_size=args.batch_size, num_workers=args.workers)
        report.update(localisation_report(model, boxed_loader, device), boxed_images=len(boxed),
                      boxes_outside_input=boxed.outside)
    return report


def per_class(class_names: list[str], scores: dict[str, Any]) -> dict[str, float | None]:
    """Accuracy per class; None for a class without images in this split."""
    counts = [sum(row) for row in scores["confusion"]]
    return {name: acc if n else None for name, acc, n in zip(class_names, scores["per_class"], counts, strict=True)}


def confusion_lines(labels: list[str], matrix: list[list[int]]) -> list[str]:
    """The matrix as text (rows true, columns predicted); with many classes, the most frequent confusions."""
    if len(labels) <= MAX_PRINTED_CLASSES:
        width = max(5, *(len(name) for name in labels))
        lines = ["  confusion (rows: true, columns: predicted):", " " * (width + 4) + " ".join(
            f"{name[:width]:>{width}}" for name in labels)]
        lines += [f"    {name:>{width}} " + " ".join(f"{n:>{width}}" for n in row) for name, row in zip(
            labels, matrix, strict=True)]
        return lines
    pairs = sorted(((n, t, p) for t, row in enumerate(matrix) for p, n in enumerate(row) if t != p and n),
                   reverse=True)[:10]
    return ["  most frequent confusions (true -> predicted):"] + [
        f"    {labels[t]} -> {labels[p]}: {n}" for n, t, p in pairs]


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['checkpoint']} ({report['version']}) on {report['dataset']} {report['split']}, "
          f"{report['images']} images")
    print(f"  top-1 {report['top1']:.4f}   top-5 {report['top5']:.4f}")
    print("  per class: " + "  ".join(f"{name} {'-' if acc is None else f'{acc:.3f}'}"
                                      for name, acc in report["per_class"].items()))
    print("\n".join(confusion_lines(report["confusion"]["labels"], report["confusion"]["matrix"])))
    if "localisation" in report:
        boxed = f" ({report['boxed_images']} images with boxes)" if "boxed_images" in report else ""
        print(f"  localisation{boxed}: share of mask mass inside the box (uniform mask = "
              f"{report['box_share']:.3f}), pointing game: share of images whose mask peak is in the box")
        for name, score in report["localisation"].items():
            print(f"    {name:<16} mass {score:.3f}   pointing {report['pointing'][name]:.3f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a Macula *.safetensors checkpoint")
    p.add_argument("--dataset", help="dataset spec as for training; default: the checkpoint's own")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="default: test where the dataset has one, else val (imagefolder: else the whole folder)")
    p.add_argument("--boxes", type=Path, metavar="CSV", help="imagefolder: object boxes (image,x0,y0,x1,y1) "
                   "for the localisation score")
    p.add_argument("--confusion-png", type=Path, metavar="PATH", help="also draw the confusion matrix here")
    p.add_argument("--canvas-size", type=int, help="cluttered-mnist canvas; default: the checkpoint's")
    p.add_argument("--clutter", type=int, help="cluttered-mnist fragments; default: the checkpoint's")
    p.add_argument("--limit", type=int, help="score only this many images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, ...")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout only)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = run(args)
    except (DatasetError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    if args.confusion_png:
        from .plots import confusion_matrix

        confusion_matrix(report["confusion"]["matrix"], report["confusion"]["labels"], args.confusion_png,
                         title=f"{Path(report['checkpoint']).name} on {report['split']} ({report['images']} images)")
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
