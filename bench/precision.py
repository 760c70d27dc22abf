"""What serving in bf16 changes: a checkpoint scored on its own test split in float32 and as Macula serves it on a
CPU with native bf16 (BatchNorm folded, bf16 weights and autocast), image by image.

    .venv/bin/python -m bench.precision model_store/demo.safetensors --json bench/out/precision.json

Reports top-1 of each, how often the two top-1s agree, the largest change of a softmax score, and how far the
uint8 masks (round(255 × spatial), what the API returns) move, in grey levels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bench.limits import as_served
from models import load_checkpoint
from training.data import limit
from training.evaluate import data_config, eval_split


def masks_uint8(maps: dict) -> torch.Tensor:
    """Every module's spatial mask as the API quantises it, flattened and concatenated per image."""
    return torch.cat([(m.spatial.float() * 255).round().flatten(1) for m in maps.values()], dim=1)


@torch.inference_mode()
def compare(model: torch.nn.Module, loader: DataLoader) -> dict:
    exact = model.eval()
    served, autocast = as_served(exact, "bfloat16")
    n = agree = right_exact = right_served = 0
    max_score_delta, mask_deltas = 0.0, []
    for images, labels, *_ in loader:
        logits, maps = exact.forward_with_attention(images)
        with autocast():
            logits_bf16, maps_bf16 = served.forward_with_attention(images)
        probs, probs_bf16 = logits.softmax(1), logits_bf16.float().softmax(1)
        top, top_bf16 = probs.argmax(1), probs_bf16.argmax(1)
        n += len(labels)
        agree += int((top == top_bf16).sum())
        right_exact += int((top == labels).sum())
        right_served += int((top_bf16 == labels).sum())
        max_score_delta = max(max_score_delta, float((probs - probs_bf16).abs().max()))
        if maps:
            mask_deltas.append((masks_uint8(maps) - masks_uint8(maps_bf16)).abs().flatten())
    deltas = torch.cat(mask_deltas) if mask_deltas else torch.zeros(1)
    return {"images": n, "top1_float32": right_exact / n, "top1_bf16_served": right_served / n,
            "top1_agreement": agree / n, "max_softmax_delta": max_score_delta,
            "mask_delta_levels": {"mean": float(deltas.mean()), "p99": float(deltas.quantile(0.99)),
                                  "max": float(deltas.max())}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--limit", type=int, help="score only this many images")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    model, meta = load_checkpoint(args.checkpoint)
    config = data_config(meta.training, argparse.Namespace(dataset=None, canvas_size=None, clutter=None,
                                                           download=False, batch_size=100, workers=0))
    _, split, dataset = eval_split(config, args.split, meta.preprocessing.eval_transform(), with_boxes=False)
    result = {"checkpoint": str(args.checkpoint), "version": meta.version, "split": split,
              **compare(model, DataLoader(limit(dataset, args.limit), batch_size=100))}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
