"""Compiled serving forms: a served model's ``forward`` and ``forward_with_attention`` compiled ahead of time with
AOTInductor, kept in a disk cache, and loaded in place of the eager model.

Why AOTInductor rather than ``torch.compile``: its artefact is one ``.pt2`` file (a shared library and the frozen,
prepacked weights) that loads in a fraction of a second with no tracing and no Python model code at run time;
``torch.compile`` re-traces the model with dynamo at every start, even with a warm inductor cache. The batch
dimension is dynamic (1 … the batch cap), the image size is the checkpoint's own (static, so inductor picks its
kernels for it).

A compiled form is only valid for what it was compiled for; :class:`CompileKey` names all of it: the checkpoint
version, torch, the device (CPU: architecture, ATen's vector ISA and every ISA extension torch probes; CUDA: the
GPU and its compute capability), the dtype it computes in, the input memory format, the batch cap, and on CPU the
thread count (inductor writes it into the generated loops). The cache file is named by the checkpoint version and
the key's digest, so any change gives a new file and nothing stale is ever loaded.

Replicas may share a cache: a form is built under an exclusive lock file (a second builder waits and then finds
the file), written to a temporary name and renamed into place, so a reader sees a whole file or none. A build that
failed leaves ``<name>.failed`` (the error) and is not retried until that file is deleted. The cache holds native
code that the service loads: only the service's own user may write to it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models import AttentionMap

from .inference import ModelRunner

log = logging.getLogger("service.compile")

SCHEME = "features-v1"  # what is compiled: pooled features (and masks) from an input cast to the runner's dtype
FORMS = ("forward", "attention")  # plain, and with every attention module's masks
SCORE_TOLERANCE = {"float32": 1e-3}  # compiled vs eager softmax scores and masks (both in [0, 1]); others below
HALF_TOLERANCE = 5e-2  # bf16/fp16 keep 8/11 bits: a few tenths of a percent per layer, well under this


# ------------------------------------------------------------------------------------------------------------ key


@dataclass(frozen=True)
class CompileKey:
    """Everything a compiled form depends on."""

    version: str  # the checkpoint's sha256[:12]
    scheme: str  # what is compiled and how (SCHEME): changes with this module's graphs
    torch: str
    device: str  # device_signature()
    dtype: str  # what the runner computes in: float32, bfloat16, float16
    memory_format: str
    max_batch: int
    threads: int  # CPU: the inference thread's torch threads; CUDA: 0

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def stem(self) -> str:
        return f"{self.version}-{self.digest}"


def device_signature(device: torch.device) -> str:
    """``cpu:<machine>:<ATen ISA>:<extensions>`` or ``cuda:<GPU name>:sm<capability>``. No compiler is needed to
    work it out (inductor's own ISA pick test-compiles), so a machine without one finds the same cache files."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    probes = sorted(name for name in dir(torch.cpu) if name.startswith("_is_") and name.endswith("_supported"))
    extensions = [name[4:-10] for name in probes if getattr(torch.cpu, name)()]
    return f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}:{','.join(extensions)}"


def compile_key(runner: ModelRunner, max_batch: int, threads: int) -> CompileKey:
    memory_format = "channels_last" if runner.memory_format is torch.channels_last else "contiguous"
    return CompileKey(version=runner.meta.version, scheme=SCHEME, torch=torch.__version__,
                      device=device_signature(runner.device), dtype=runner.precision, memory_format=memory_format,
                      max_batch=max_batch,
                      threads=threads if runner.device.type == "cpu" else 0)


# ---------------------------------------------------------------------------------------------------------- cache


class CompileCache:
    """The files of one cache directory: ``<stem>.<form>.pt2`` packages, ``.failed`` markers, ``.lock`` files,
    ``<stem>.decision.json`` (whether the compiled form paid, measured once per key) and ``<stem>.tuning.json``
    (a model's timings by batch size and memory format: service/tuning.py, its own key)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def package(self, key: CompileKey, form: str) -> Path:
        return self.root / f"{key.stem}.{form}.pt2"

    def failure(self, key: CompileKey, form: str) -> Path:
        return self.root / f"{key.stem}.{form}.failed"

    def decision(self, key: CompileKey) -> Path:
        return self.root / f"{key.stem}.decision.json"

    def tuning(self, key: Any) -> Path:
        """``key``: a ``service.tuning.TuneKey``."""
        return self.root / f"{key.stem}.tuning.json"

    @contextlib.contextmanager
    def locked(self, key: Any, form: str) -> Iterator[None]:
        """Hold ``<stem>.<form>.lock`` exclusively (released by the OS if this process dies); ``key``: anything
        with a ``stem`` (a :class:`CompileKey`, a ``service.tuning.TuneKey``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key.stem}.{form}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write_atomic(self, target: Path, text: str) -> bool:
        """Write ``target`` whole or not at all; False where the cache is read-only (the note is then not kept)."""
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, target)
        except OSError as exc:
            log.info("could not write %s: %s", target, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False
        return True

    def read_decision(self, key: CompileKey) -> dict[str, Any] | None:
        """The kept ``auto`` verdict, or None (none yet, or unreadable: then it is measured again)."""
        try:
            decision = json.loads(self.decision(key).read_text())
        except (OSError, ValueError):
            return None
        valid = (isinstance(decision, dict) and isinstance(decision.get("pays"), bool)
                 and all(isinstance(decision.get(k), int | float) and decision[k] > 0
                         for k in ("eager_s", "compiled_s", "batch")))
        return decision if valid else None

    def quarantine(self, path: Path) -> None:
        """Move an unloadable package aside (``.bad``), so the next build replaces it."""
        with contextlib.suppress(OSError):
            os.replace(path, path.with_suffix(".bad"))


# ---------------------------------------------------------------------------------------------------------- build


class _Features(nn.Module):
    """The runner's prepared model up to its pooled features, computing in ``dtype`` (the runner's autocast, made
    explicit). The classifier (``fc``, one small matmul) stays eager: the runner needs the features themselves
    for a checkpoint's unfamiliar-input detector, so one compiled graph serves every path."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x.to(self.dtype))


class _FeaturesWithAttention(_Features):
    """``(features, spatial masks..., channel masks...)``, the masks in network order."""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        maps: dict[str, AttentionMap] = {}
        features = self.model.forward_features(x.to(self.dtype), maps)
        return (features, *(m.spatial for m in maps.values()), *(m.channel for m in maps.values()))


def example_pixels(runner: ModelRunner, batch: int, seed: int = 0) -> np.ndarray:
    """Random uint8 (N, H, W, C) pixels, as the batcher hands them to the runner."""
    return np.random.default_rng(seed).integers(0, 256, (batch, *runner.input_shape), dtype=np.uint8)


def export_form(runner: ModelRunner, form: str, max_batch: int) -> torch.export.ExportedProgram:
    """``torch.export`` of one form with a dynamic batch (1 … ``max_batch``), on the runner's exact input layout."""
    dtype = runner.amp_dtype or torch.float32
    model = runner.model  # CPU bf16: the runner stores its weights in bf16 already; CUDA autocast: a copy in dtype
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    module = (_FeaturesWithAttention if form == "attention" else _Features)(model, dtype).eval()
    x = runner._to_device(example_pixels(runner, min(2, max_batch)))  # not 1: a size of 1 is specialised
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if max_batch > 1 else None
    with torch.inference_mode(False), torch.no_grad():
        return torch.export.export(module, (x,), dynamic_shapes=shapes)


def inductor_configs(key: CompileKey) -> dict[str, Any]:
    """Freezing folds and prepacks the weights (oneDNN layouts on CPU); on CPU the loops get the serving thread
    count, which is part of the key."""
    configs: dict[str, Any] = {"freezing": True}
    if key.device.startswith("cpu"):
        configs["cpp.threads"] = key.threads
    return configs


def build(runner: ModelRunner, form: str, key: CompileKey, cache: CompileCache, *, force: bool = False) -> Path:
    """Compile ``form`` of ``runner``'s model into the cache (a no-op if it is there, unless ``force``); returns
    the package. Raises on any failure, after writing ``<name>.failed`` with the error."""
    target = cache.package(key, form)
    with cache.locked(key, form):
        if target.exists() and not force:
            return target
        for stale in cache.root.glob(f".{target.stem}.*.tmp.pt2"):  # a killed builder's; under the lock, no one's
            stale.unlink(missing_ok=True)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.pt2")
        started = time.perf_counter()
        try:
            program = export_form(runner, form, key.max_batch)
            import torch._inductor

            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                     inductor_configs=inductor_configs(key))
            os.replace(tmp, target)
        except Exception as exc:
            cache.write_atomic(cache.failure(key, form), f"{type(exc).__name__}: {exc}\n")
            raise
        finally:
            tmp.unlink(missing_ok=True)
        cache.failure(key, form).unlink(missing_ok=True)
        log.info("compiled %s %s in %.0f s: %s", runner.name, form, time.perf_counter() - started, target)
        return target


# ----------------------------------------------------------------------------------------------------------- load


def load_package(path: Path, device: torch.device) -> Any:
    """The callable in an AOTInductor package (raises on a missing, truncated or foreign file)."""
    if device.type == "cpu":  # the loader looks for a CUDA toolkit and warns that a CPU machine has none
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch._inductor

    index = device.index if device.type == "cuda" and device.index is not None else -1
    return torch._inductor.aoti_load_package(str(path), device_index=index)


def attention_names(runner: ModelRunner) -> list[str]:
    """The attention modules' names in the order their masks come out (one eager forward of one image)."""
    if not runner.has_attention:
        return []
    with torch.inference_mode(), torch.autocast(runner.device.type, dtype=runner.amp_dtype,
                                                enabled=runner.amp_dtype is not None):
        return list(runner.model.forward_with_attention(runner._to_device(example_pixels(runner, 1)))[1])


class CompiledModel:
    """What :class:`ModelRunner` calls in place of its eager model: ``model(x)``,
    ``model.forward_with_attention(x)``, ``model.forward_features(x, maps)`` and ``model.fc``. The features (and
    masks) come from the compiled form where its package is loaded, else from the eager model; ``fc`` is eager."""

    def __init__(self, eager: nn.Module, names: list[str], forms: dict[str, Any] | None = None) -> None:
        self.eager, self.names, self.forms = eager, names, dict(forms or {})
        self.fc = eager.fc

    def with_form(self, form: str, package: Any) -> CompiledModel:
        return CompiledModel(self.eager, self.names, {**self.forms, form: package})

    def forward_features(self, x: Tensor, maps: dict[str, AttentionMap] | None = None) -> Tensor:
        compiled = self.forms.get("forward" if maps is None else "attention")
        if compiled is None:
            return self.eager.forward_features(x, maps)
        with torch.autocast(x.device.type, enabled=False):  # the package computes in its own dtype
            outputs = compiled(x)
        if maps is None:
            return outputs
        features, *masks = outputs
        n = len(self.names)
        maps.update({name: AttentionMap(masks[i], masks[n + i]) for i, name in enumerate(self.names)})
        return features

    def __call__(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, dict[str, AttentionMap]]:
        maps: dict[str, AttentionMap] = {}
        features = self.forward_features(x, maps)
        return self.fc(features), maps


# --------------------------------------------------------------------------------------------- check and measure


def tolerance(precision: str) -> float:
    return SCORE_TOLERANCE.get(precision, HALF_TOLERANCE)


def mismatch(runner: ModelRunner, candidate: CompiledModel, form: str, batch_sizes: tuple[int, ...]) -> str | None:
    """Run ``form`` of the runner eager and with ``candidate`` on the same random images; describe the first
    difference beyond the precision's tolerance (scores and masks both lie in [0, 1]), or None. Call on the
    inference thread."""
    tol, with_masks = tolerance(runner.precision), form == "attention"
    previous = runner.compiled
    try:
        for size in batch_sizes:
            pixels = example_pixels(runner, size, seed=size)
            runner.compiled = None
            want = runner.run(pixels, attention=with_masks)
            runner.compiled = candidate
            problem = _compare(want, runner.run(pixels, attention=with_masks), tol)
            if problem:
                return f"batch {size}: {problem}"
    finally:
        runner.compiled = previous
    return None


def _compare(want: list, got: list, tol: float) -> str | None:
    scores = max(float(np.abs(w.scores - g.scores).max()) for w, g in zip(want, got, strict=True))
    if scores > tol:
        return f"scores differ by {scores:.3g} (tolerance {tol:g})"
    for w, g in zip(want, got, strict=True):
        for name, mask in (w.masks or {}).items():
            diff = int(np.abs(mask.astype(np.int16) - g.masks[name].astype(np.int16)).max())
            if diff > round(255 * tol) + 1:
                return f"mask {name} differs by {diff}/255"
    return None


def time_forward(runner: ModelRunner, model: CompiledModel | None, pixels: np.ndarray) -> float:
    """Seconds of one plain forward of ``pixels`` with ``model`` (None: eager). Call on the inference thread."""
    previous = runner.compiled
    runner.compiled = model
    try:
        started = time.perf_counter()
        runner.run(pixels)
        return time.perf_counter() - started
    finally:
        runner.compiled = previous
