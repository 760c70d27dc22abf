"""Export a Macula ResNet with dynamic batch, height and width: ``torch.export``, ONNX, TorchScript.

The networks pool with ``mean``/``amax`` and the global average pool is adaptive, so nothing in the
graph depends on the input size (the authors' BAM pools with ``kernel_size=H`` and bakes it in).
One constraint remains: a symbolic size of 1 cannot be told from a broadcast, so ``torch.export``
needs every feature map to be at least 2×2. :func:`min_input_size` is twice the network's total
stride (64 for the ImageNet stem, 8 for resnet20…110, 16 for resnet18…152 with the CIFAR stem);
smaller inputs are refused by the exported program (eager mode still takes them).

    from models import create_model
    from models.export import export_onnx, export_program

    model = create_model("resnet50", attention="cbam").eval()
    program = export_program(model)                 # torch.export.ExportedProgram
    export_onnx(model, "resnet50_cbam.onnx")        # run it with onnxruntime; input "image", output "logits"
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

MAX_BATCH = 1024
MAX_SIZE = 4096


def total_stride(model: nn.Module) -> int:
    """Input pixels per pixel of the last feature map: 4 for the ImageNet stem, ×2 per stage after the first."""
    stem = 4 if isinstance(model.maxpool, nn.MaxPool2d) else 1
    return stem * 2 ** (model.num_stages - 1)


def min_input_size(model: nn.Module) -> int:
    """The smallest height/width the exported program accepts: the last feature map is then 2×2."""
    return 2 * total_stride(model)


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A valid example for tracing: batch 2, the smallest size (neither may be 1: 0/1 sizes specialise)."""
    size = min_input_size(model)
    param = next(model.parameters())
    return torch.randn(batch, model.conv1.in_channels, size, size, device=param.device, dtype=param.dtype)


def dynamic_shapes(model: nn.Module) -> dict[str, dict[int, Dim]]:
    """``torch.export`` dims for the ``x`` argument: batch 1…1024, height and width ``min_input_size``…4096."""
    lo = min_input_size(model)
    return {"x": {0: Dim("batch", min=1, max=MAX_BATCH), 2: Dim("height", min=lo, max=MAX_SIZE),
                  3: Dim("width", min=lo, max=MAX_SIZE)}}


def export_program(model: nn.Module) -> ExportedProgram:
    """``torch.export.export`` of ``model.eval()`` with dynamic batch, height and width."""
    model = model.eval()
    return torch.export.export(model, (example_input(model),), dynamic_shapes=dynamic_shapes(model))


def export_onnx(model: nn.Module, path: str | os.PathLike, *, dynamo: bool = True, opset: int | None = None) -> Path:
    """Write ``model`` as one self-contained ONNX file with dynamic batch, height and width.

    ``dynamo=True`` uses the ``torch.export``-based exporter (the supported one); ``dynamo=False`` the
    legacy TorchScript exporter with ``dynamic_axes``. Input ``image`` (N, C, H, W), output ``logits``.
    """
    model, path = model.eval(), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": ["image"], "output_names": ["logits"]}
    if opset is not None:
        names["opset_version"] = opset
    if dynamo:
        torch.onnx.export(model, (example_input(model),), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=dynamic_shapes(model), verbose=False, **names)
    else:
        axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
        torch.onnx.export(model, (example_input(model),), str(path), dynamo=False, dynamic_axes=axes, **names)
    return path


def trace(model: nn.Module, *, check_trace: bool = True) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` (TorchScript, deprecated by PyTorch but still supported); any input size works.

    ``check_trace`` re-runs the model to compare (torch's default); turn it off when you compare yourself.
    """
    model = model.eval()
    with torch.no_grad():
        return torch.jit.trace(model, example_input(model), check_trace=check_trace)
