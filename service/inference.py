"""What the model does: load a checkpoint onto a device, run a batch, return scores and attention masks.

Runs on the batcher's inference thread only. CUDA gets autocast (bf16 by default), channels_last, pinned
host memory and non-blocking copies; an out-of-memory batch is split in halves and retried. CPU keeps
float32 (autocast bf16 on CPUs without AMX is slower, and batching must not change results).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import CheckpointMetadata, load_checkpoint

log = logging.getLogger("service.inference")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}


@dataclass
class ImageResult:
    """One image's output: softmax scores and, when asked, each attention module's spatial map as uint8."""

    scores: np.ndarray  # float32 (num_classes,)
    masks: dict[str, np.ndarray] | None = None  # module name -> uint8 (h, w) = round(255 * spatial)


class ModelRunner:
    """One served model on one device."""

    def __init__(self, name: str, path: Path, *, device: str = "cpu", amp_dtype: str = "bfloat16",
                 channels_last: bool = True) -> None:
        self.name, self.path, self.device = name, path, torch.device(device)
        model, self.meta = load_checkpoint(path, map_location=self.device)
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.amp_dtype = AMP_DTYPES[amp_dtype] if self.device.type == "cuda" else None
        self.has_attention = bool(self.meta.arch.get("attention"))

    @property
    def metadata(self) -> CheckpointMetadata:
        return self.meta

    @property
    def input_shape(self) -> tuple[int, int, int]:
        pre = self.meta.preprocessing
        return (3 if pre.color == "RGB" else 1, *pre.input_size)

    def run(self, inputs: np.ndarray, attention: bool = False) -> list[ImageResult]:
        """(N, C, H, W) float32 → N results; CUDA OOM splits the batch and retries the halves."""
        try:
            return self._forward(inputs, attention)
        except torch.OutOfMemoryError:
            if len(inputs) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(inputs) // 2
            log.warning("CUDA out of memory at batch %d for %r; retrying as %d + %d", len(inputs), self.name,
                        half, len(inputs) - half)
            return self.run(inputs[:half], attention) + self.run(inputs[half:], attention)

    def _to_device(self, inputs: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def _forward(self, inputs: np.ndarray, attention: bool) -> list[ImageResult]:
        x = self._to_device(inputs)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if attention and self.has_attention:
                logits, maps = self.model.forward_with_attention(x)
            else:
                logits, maps = self.model(x), {}
        scores = logits.float().softmax(dim=1).cpu().numpy()
        masks = {name: (m.spatial.float() * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].cpu().numpy()
                 for name, m in maps.items()}
        if scores.shape[0] != len(inputs):
            raise RuntimeError(f"{self.name}: {scores.shape[0]} outputs for {len(inputs)} inputs")
        return [ImageResult(scores[i], {k: v[i] for k, v in masks.items()} if attention else None)
                for i in range(len(inputs))]

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size the batcher can form (and the attention path), so no request pays for
        first-call allocations or kernel selection."""
        for size in range(1, max_batch_size + 1):
            self.run(np.zeros((size, *self.input_shape), np.float32), attention=size in (1, max_batch_size))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
