"""What the model does: load a checkpoint onto a device, run a batch, return scores and attention masks.

Runs on the batcher's inference thread only. At load every BatchNorm is folded into its conv (exact, and faster:
docs/benchmarks.md has the measurements). A batch arrives as the codec's uint8 (N, H, W, C) pixels: stacking and
copying 8-bit pixels costs a quarter of floats (and a quarter of the host→GPU copy), and normalising the whole
batch is one vectorised pass whose result is already channels_last. Autocast follows ``amp_dtype`` (bf16 by
default) on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX; elsewhere emulated bf16 is slower than
float32, so float32). On such a CPU the weights are stored in bf16 too (cast once at load): half the memory per
served model, outputs bit-identical to autocast over float32 weights. CUDA also gets pinned host memory and
non-blocking copies. A CUDA out-of-memory error frees the allocator's cache and is re-raised: the batcher splits
the batch (batching.py has the one splitting mechanism, for any failing batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import fold_batchnorm, load_checkpoint
from models.familiarity import detector_scores, familiarity, is_familiar, probabilities

from .settings import CPU_BATCH_DEFAULTS, CUDA_BATCH_DEFAULTS

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def autocast_dtype(device: torch.device, amp_dtype: str, *, native_cpu_bf16: bool | None = None) -> torch.dtype | None:
    """The dtype a runner autocasts to: ``amp_dtype`` on CUDA; on CPU only bfloat16, and only with native bf16."""
    dtype = AMP_DTYPES[amp_dtype]
    if device.type == "cuda" or dtype is None:
        return dtype
    native = cpu_has_native_bf16() if native_cpu_bf16 is None else native_cpu_bf16
    return dtype if dtype is torch.bfloat16 and native else None


def prepare_for_serving(model: nn.Module, device: torch.device, dtype: torch.dtype | None, *,
                        memory_format: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """``model`` as a runner serves it (changed in place): eval mode, BatchNorm folded, in ``memory_format``; on
    CPU under bf16 autocast (``dtype``) its weights are stored in bf16, so autocast only casts the input."""
    model = fold_batchnorm(model.eval()).to(memory_format=memory_format)
    return model.to(torch.bfloat16) if device.type == "cpu" and dtype is torch.bfloat16 else model


@dataclass
class ImageResult:
    """One image's output: softmax scores and, when asked, each attention module's spatial map as uint8."""

    scores: np.ndarray  # float32 (num_classes,): softmax(logits / T), T the checkpoint's temperature (else 1)
    masks: dict[str, np.ndarray] | None = None  # module name -> uint8 (h, w) = round(255 * spatial)
    familiar: bool | None = None  # None: the checkpoint carries no unfamiliar-input detector
    familiarity: float | None = None


class ModelRunner:
    """One served model on one device."""

    def __init__(self, name: str, path: Path, *, device: str = "cpu", amp_dtype: str = "bfloat16",
                 channels_last: bool = True, max_batch_size: int | None = None,
                 native_cpu_bf16: bool | None = None) -> None:
        self.name, self.path, self.device = name, path, torch.device(device)
        model, self.meta = load_checkpoint(path, map_location=self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # the largest batch the batcher forms for this model (default: the device's) ...
        self.max_batch_size = max_batch_size or (CUDA_BATCH_DEFAULTS if self.device.type == "cuda"
                                                 else CPU_BATCH_DEFAULTS)[0]
        # ... and how it and the memory format were decided: "tuned", "configured" or "default" (service/tuning.py)
        self.tuning = {"max_batch_size": "configured", "memory_format": "configured"}
        self.amp_dtype = autocast_dtype(self.device, amp_dtype, native_cpu_bf16=native_cpu_bf16)
        self.model = prepare_for_serving(model, self.device, self.amp_dtype, memory_format=self.memory_format)
        self.has_attention = bool(self.meta.arch.get("attention"))
        self.calibration = self.meta.calibration  # temperature and unfamiliar-input detector (models.familiarity)
        self.detector = self.calibration.detector if self.calibration is not None else None
        self.compiled: Any = None  # service.compiled.CompiledModel once swapped in (on the inference thread)
        self.attention_modules: list[str] = []  # the attention maps' module names, known after the first forward
        self.attention_sizes: dict[str, tuple[int, int]] = {}  # their (h, w) at the model's input size, known then too
        pre = self.meta.preprocessing  # (x / 255 - mean) / std  ==  (x - 255 mean) / (255 std)
        self.pixel_mean = torch.tensor(pre.mean, device=self.device).mul(255).view(1, -1, 1, 1)
        self.pixel_std = torch.tensor(pre.std, device=self.device).mul(255).view(1, -1, 1, 1)

    @property
    def precision(self) -> str:
        """``"bfloat16"`` / ``"float16"`` (autocast) or ``"float32"``: what this runner computes in."""
        return str(self.amp_dtype or torch.float32).removeprefix("torch.")

    @property
    def memory_format_name(self) -> str:
        """``"channels_last"`` or ``"contiguous"``: the layout of the weights and of every input batch."""
        return next(name for name, fmt in MEMORY_FORMATS.items() if fmt is self.memory_format)

    def use_memory_format(self, name: str, model: nn.Module | None = None) -> None:
        """Serve in memory format ``name``: the model converted, or ``model``, a copy already in it (call on the
        runner's thread, before any compiled form is swapped in)."""
        self.memory_format = MEMORY_FORMATS[name]
        self.model = model if model is not None else self.model.to(memory_format=self.memory_format)

    @property
    def serving_form(self) -> str:
        """``"compiled"`` once the compiled forward serves (service/compiled.py), else ``"eager"``."""
        return "compiled" if self.compiled is not None and "forward" in self.compiled.forms else "eager"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image's pixels."""
        pre = self.meta.preprocessing
        return (*pre.input_size, 3 if pre.color == "RGB" else 1)

    def run(self, inputs: np.ndarray, attention: bool = False) -> list[ImageResult]:
        """uint8 (N, H, W, C) pixels → N results. On CUDA out-of-memory the cache is freed and the error re-raised
        for the batcher to split the batch."""
        try:
            return self._forward(inputs, attention)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 NHWC → normalised float32 NCHW on the device; NHWC memory is channels_last already."""
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().sub_(self.pixel_mean).div_(self.pixel_std)
        return x.contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def _forward(self, inputs: np.ndarray, attention: bool) -> list[ImageResult]:
        x = self._to_device(inputs)
        model = self.compiled or self.model  # the compiled forms (service/compiled.py) once swapped in
        features = None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.detector is not None:  # the detector needs the penultimate features too
                maps = {} if attention and self.has_attention else None
                features = model.forward_features(x, maps)
                logits, maps = model.fc(features), maps or {}
            elif attention and self.has_attention:
                logits, maps = model.forward_with_attention(x)
            else:
                logits, maps = model(x), {}
        if maps and not self.attention_modules:
            self.attention_sizes = {name: tuple(m.spatial.shape[-2:]) for name, m in maps.items()}
            self.attention_modules = list(maps)
        scores = probabilities(logits, self.calibration).cpu().numpy()
        masks = {name: (m.spatial.float() * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].cpu().numpy()
                 for name, m in maps.items()}
        if scores.shape[0] != len(inputs):
            raise RuntimeError(f"{self.name}: {scores.shape[0]} outputs for {len(inputs)} inputs")
        flags, values = self._familiarity(features, logits)
        return [ImageResult(scores[i], {k: v[i] for k, v in masks.items()} if attention else None,
                            None if flags is None else bool(flags[i]), None if values is None else float(values[i]))
                for i in range(len(inputs))]

    def _familiarity(self, features: torch.Tensor | None, logits: torch.Tensor
                     ) -> tuple[list[bool] | None, list[float] | None]:
        """Each image's familiar flag and familiarity (models.familiarity), or ``(None, None)`` without a detector."""
        if self.detector is None or features is None:
            return None, None
        scores = detector_scores(self.detector, features.float(), logits.float(), self.calibration.temperature)
        return is_familiar(self.detector, scores).tolist(), familiarity(self.detector, scores).tolist()

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size the batcher can form (and the attention path), so no request pays for
        first-call allocations or kernel selection."""
        for size in range(1, max_batch_size + 1):
            self.run(np.zeros((size, *self.input_shape), np.uint8), attention=size in (1, max_batch_size))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
