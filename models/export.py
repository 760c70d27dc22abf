"""Export a Macula ResNet with dynamic batch, height and width: ``torch.export``, ONNX, TorchScript.

From the command line, a checkpoint in one step (class names and preprocessing go with it)::

    python -m models.export model_store/demo.safetensors --format onnx --out demo.onnx --attention

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
    export_onnx(WithAttention(model), "masks.onnx") # outputs "logits", then one mask per attention module

The input is the normalised image tensor ``(N, C, H, W)``: resize and normalise as the checkpoint's
``preprocessing`` says (the CLI writes it into the file). With attention, every module's spatial
mask ``(N, 1, h, w)`` in [0, 1] (``AttentionMap.spatial``) is an extra output named after the module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from .checkpoint import CheckpointError, load_checkpoint

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
METADATA_FILE = "macula.json"  # TorchScript / ExportedProgram: the metadata as an extra file in the archive

MAX_BATCH = 1024
MAX_SIZE = 4096


class WithAttention(nn.Module):
    """``model`` returning ``(logits, mask, mask, ...)``: every attention module's spatial mask, in network order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            _, maps = model.eval().forward_with_attention(example_input(model))
        self.module_names = list(maps)
        if not self.module_names:
            raise ValueError("the model has no attention modules (attention=None): nothing to export as masks")

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        logits, maps = self.model.forward_with_attention(x)
        return (logits, *(attention_map.spatial for attention_map in maps.values()))


def network(model: nn.Module) -> nn.Module:
    """The ResNet inside a :class:`WithAttention` (its stem and stages decide the sizes)."""
    return model.model if isinstance(model, WithAttention) else model


def output_names(model: nn.Module) -> list[str]:
    return ["logits", *getattr(model, "module_names", [])]


def total_stride(model: nn.Module) -> int:
    """Input pixels per pixel of the last feature map: 4 for the ImageNet stem, ×2 per stage after the first."""
    model = network(model)
    stem = 4 if isinstance(model.maxpool, nn.MaxPool2d) else 1
    return stem * 2 ** (model.num_stages - 1)


def min_input_size(model: nn.Module) -> int:
    """The smallest height/width the exported program accepts: the last feature map is then 2×2."""
    return 2 * total_stride(model)


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A valid example for tracing: batch 2, the smallest size (neither may be 1: 0/1 sizes specialise)."""
    size = min_input_size(model)
    param = next(model.parameters())
    return torch.randn(batch, network(model).conv1.in_channels, size, size, device=param.device, dtype=param.dtype)


def dynamic_shapes(model: nn.Module) -> dict[str, dict[int, Dim]]:
    """``torch.export`` dims for the ``x`` argument: batch 1…1024, height and width ``min_input_size``…4096."""
    lo = min_input_size(model)
    return {"x": {0: Dim("batch", min=1, max=MAX_BATCH), 2: Dim("height", min=lo, max=MAX_SIZE),
                  3: Dim("width", min=lo, max=MAX_SIZE)}}


def export_program(model: nn.Module) -> ExportedProgram:
    """``torch.export.export`` of ``model.eval()`` with dynamic batch, height and width."""
    model = model.eval()
    return torch.export.export(model, (example_input(model),), dynamic_shapes=dynamic_shapes(model))


def export_onnx(model: nn.Module, path: str | os.PathLike, *, dynamo: bool = True, opset: int | None = None,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as one self-contained ONNX file with dynamic batch, height and width.

    ``dynamo=True`` uses the ``torch.export``-based exporter (the supported one); ``dynamo=False`` the
    legacy TorchScript exporter with ``dynamic_axes``. Input ``image`` (N, C, H, W), output ``logits``
    (and, for a :class:`WithAttention`, one mask per module, named after it). ``metadata`` goes into
    the model's ``metadata_props`` (string to string).
    """
    model, path = model.eval(), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = output_names(model)
    names = {"input_names": ["image"], "output_names": outputs}
    if opset is not None:
        names["opset_version"] = opset
    if dynamo:
        torch.onnx.export(model, (example_input(model),), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=dynamic_shapes(model), verbose=False, **names)
    else:
        axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"},
                **{name: {0: "batch", 2: f"{name}.height", 3: f"{name}.width"} for name in outputs[1:]}}
        torch.onnx.export(model, (example_input(model),), str(path), dynamo=False, dynamic_axes=axes, **names)
    if metadata:
        add_onnx_metadata(path, metadata)
    return path


def add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set ``metadata_props`` entries of the ONNX file at ``path`` (rewritten in place)."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
    onnx.save(proto, str(path))


def trace(model: nn.Module, *, check_trace: bool = True) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` (TorchScript, deprecated by PyTorch but still supported); any input size works.

    ``check_trace`` re-runs the model to compare (torch's default); turn it off when you compare yourself.
    """
    model = model.eval()
    with torch.no_grad():
        return torch.jit.trace(model, example_input(model), check_trace=check_trace)


# ---------------------------------------------------------------------------------- from a checkpoint


def export_metadata(meta, outputs: list[str]) -> dict[str, str]:
    """What a consumer of the exported file needs, as strings (JSON inside): classes, preprocessing, outputs."""
    return {"format": "macula.export", "class_names": json.dumps(meta.class_names),
            "preprocessing": json.dumps(asdict(meta.preprocessing)), "arch": json.dumps(meta.arch),
            "checkpoint_version": meta.version, "input": "image", "outputs": json.dumps(outputs)}


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, format: str = "onnx",
                      attention: bool = False) -> dict[str, Any]:
    """Export the model in ``checkpoint`` to ``out``; returns the metadata written with it."""
    model, meta = load_checkpoint(checkpoint)
    exported: nn.Module = WithAttention(model) if attention else model
    metadata = export_metadata(meta, output_names(exported))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the exporters' deprecation and tracer chatter is not the user's concern
        warnings.simplefilter("ignore")
        if format == "onnx":
            export_onnx(exported, out, metadata=metadata)
        elif format == "torchscript":
            torch.jit.save(trace(exported), str(out), _extra_files={METADATA_FILE: json.dumps(metadata)})
        elif format == "exported-program":
            torch.export.save(export_program(exported), str(out), extra_files={METADATA_FILE: json.dumps(metadata)})
        else:
            raise ValueError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    return metadata


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.export", description="Export a Macula checkpoint with dynamic batch, height and "
        "width. The input is the normalised image (N, C, H, W); class names and preprocessing are written into the "
        "file (ONNX metadata_props; macula.json inside TorchScript and ExportedProgram archives).")
    p.add_argument("checkpoint", type=Path, help="a Macula *.safetensors checkpoint")
    p.add_argument("--format", choices=list(FORMATS), default="onnx",
                   help="onnx (onnxruntime, TensorRT...), torchscript (torch.jit.load) or exported-program "
                        "(torch.export.load); default onnx")
    p.add_argument("--out", type=Path, help="output file; default: the checkpoint's name with .onnx, .pt or .pt2")
    p.add_argument("--attention", action="store_true",
                   help="also output every attention module's spatial mask (N, 1, h, w), named after the module")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = args.out or args.checkpoint.with_suffix(FORMATS[args.format])
    try:
        metadata = export_checkpoint(args.checkpoint, out, format=args.format, attention=args.attention)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # onnx / onnxscript are an optional extra
        print(f"error: --format {args.format} needs the Python package {exc.name!r}: "
              f"pip install 'macula[export]' (onnx, onnxscript, onnxruntime)", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}): input image (N, C, H, W) -> {', '.join(json.loads(metadata['outputs']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
