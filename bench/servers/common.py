"""What the peer servers share: load the checkpoint, decode + preprocess one JPEG, format the top-k answer."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from bench.limits import as_served
from models import load_checkpoint

PRECISION_ENV = "BENCH_PEER_PRECISION"  # float32 (default) or bfloat16: what run_serving --peer-precision sets


class Classifier:
    """A Macula checkpoint with its eval transform: ``preprocess(bytes) -> CHW``, ``classify(NCHW) -> answers``."""

    def __init__(self, checkpoint: str | Path, top_k: int = 5, precision: str | None = None) -> None:
        model, self.meta = load_checkpoint(checkpoint)
        self.precision = precision or os.environ.get(PRECISION_ENV, "float32")
        self.model, self.autocast = as_served(model.eval(), self.precision)
        self.transform: Callable[[Image.Image], torch.Tensor] = self.meta.preprocessing.eval_transform()
        self.top_k = min(top_k, self.meta.num_classes)

    @property
    def module(self) -> nn.Module:
        return self.model

    def preprocess(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            return self.transform(image)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            return self.model(batch).float().softmax(dim=1)

    def answer(self, probs: torch.Tensor) -> dict:
        """One image's ``{"top_k": [...]}`` from its probability row."""
        scores, indices = probs.topk(self.top_k)
        names = self.meta.class_names
        return {"top_k": [{"index": int(i), "label": names[int(i)], "score": float(s)}
                          for s, i in zip(scores.tolist(), indices.tolist(), strict=True)]}

    def classify(self, batch: torch.Tensor) -> list[dict]:
        return [self.answer(row) for row in self.probabilities(batch)]
