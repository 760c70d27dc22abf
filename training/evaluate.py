"""``python -m training.evaluate CKPT``: accuracy of a checkpoint and, on cluttered-mnist, where its masks point.

    python -m training.evaluate model_store/demo.safetensors                  # data from the checkpoint
    python -m training.evaluate runs/x/model.safetensors --dataset imagefolder:data/pets --json -

Reports top-1/top-5 and per-class accuracy. On cluttered-mnist it also reports, per attention
module, the localisation score (share of the spatial mask's mass inside the digit's box, see
``training.localisation``) next to the box-area share, which is what a uniform mask scores, and the
pointing-game hit rate (mask peak inside the box). Images
go through the checkpoint's own ``preprocessing.eval_transform()``, exactly as the service does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from models import CheckpointError, load_checkpoint

from .cli import user_message
from .config import TrainConfig
from .data import DatasetError, build_datasets, cluttered_mnist, limit
from .engine import evaluate
from .localisation import localisation


def data_config(meta_training: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    """The dataset to score on: ``--dataset`` if given, else the one the checkpoint was trained on."""
    dataset = args.dataset or meta_training.get("dataset")
    if not dataset:
        raise DatasetError("the checkpoint does not name its dataset: pass --dataset")
    return TrainConfig(dataset=dataset, canvas_size=args.canvas_size or meta_training.get("canvas_size", 64),
                       clutter=args.clutter if args.clutter is not None else meta_training.get("clutter", 6),
                       download=args.download, batch_size=args.batch_size, workers=args.workers)


def eval_split(config: TrainConfig, split: str, transform, with_boxes: bool):
    bundle = cluttered_mnist("", config, return_box=True) if with_boxes else build_datasets(config)
    dataset = getattr(bundle, split)
    if dataset is None:
        split, dataset = "val", bundle.val  # imagefolder / CIFAR have no separate test split
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    base.transform = transform  # the checkpoint's own eval pipeline, as served
    return bundle.class_names, split, dataset


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(args.checkpoint, map_location=device)
    config = data_config(meta.training, args)
    with_boxes = config.dataset == "cluttered-mnist"
    class_names, split, dataset = eval_split(config, args.split, meta.preprocessing.eval_transform(), with_boxes)
    if class_names != meta.class_names:
        raise DatasetError(f"dataset classes {class_names[:5]}... differ from the checkpoint's "
                           f"{meta.class_names[:5]}...")
    dataset = limit(dataset, args.limit)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    scores = evaluate(model, loader, config, device=device, num_classes=len(class_names), is_main=False)
    report = {"checkpoint": str(args.checkpoint), "version": meta.version, "dataset": config.dataset, "split": split,
              "images": scores["n"], "top1": scores["acc"], "top5": scores["top5"],
              "per_class": dict(zip(class_names, scores["per_class"], strict=True))}
    if with_boxes:
        loc = localisation(model, loader, device=device)
        report["box_share"] = loc.pop("box_share")
        report["pointing"] = {k.split(":", 1)[1]: v for k, v in loc.items() if k.startswith("pointing:")}
        report["localisation"] = {k: v for k, v in loc.items() if not k.startswith("pointing:")}
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['checkpoint']} ({report['version']}) on {report['dataset']} {report['split']}, "
          f"{report['images']} images")
    print(f"  top-1 {report['top1']:.4f}   top-5 {report['top5']:.4f}")
    print("  per class: " + "  ".join(f"{name} {acc:.3f}" for name, acc in report["per_class"].items()))
    if "localisation" in report:
        print(f"  localisation: share of mask mass inside the digit box (uniform mask = {report['box_share']:.3f}), "
              f"pointing game: share of images whose mask peak is in the box")
        for name, score in report["localisation"].items():
            print(f"    {name:<16} mass {score:.3f}   pointing {report['pointing'][name]:.3f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a Macula *.safetensors checkpoint")
    p.add_argument("--dataset", help="dataset spec as for training; default: the checkpoint's own")
    p.add_argument("--split", choices=["val", "test"], default="test", help="test where the dataset has one")
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
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
