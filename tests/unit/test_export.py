"""Exported models (torch.export, ONNX via onnxruntime, TorchScript trace) equal eager at other sizes;
``python -m models.export`` writes them from a checkpoint with class names, preprocessing and masks."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import create_model, load_checkpoint
from models.export import METADATA_FILE, export_onnx, export_program, main, min_input_size, trace
from tests.conftest import make_checkpoint

REPO = Path(__file__).resolve().parents[2]

# Two batch sizes × two input sizes (square and non-square, odd), none of them the tracing example.
INPUTS = {"cifar": [(1, 40, 40), (3, 33, 57)], "imagenet": [(1, 96, 96), (3, 129, 71)]}


def build(name: str, attention: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, attention=attention, num_classes=10, **kwargs)
    model.train()
    with torch.no_grad():  # non-default BatchNorm statistics
        model(torch.randn(4, 3, 64, 64))
    return model.eval()


def check(run, model: torch.nn.Module, inputs: list[tuple[int, int, int]]) -> None:
    for n, h, w in inputs:
        x = torch.randn(n, 3, h, w)
        with torch.inference_mode():
            expected = model(x)
        got = torch.as_tensor(run(x))
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_min_input_size() -> None:
    assert min_input_size(create_model("resnet50")) == 64
    assert min_input_size(create_model("resnet20")) == 8
    assert min_input_size(create_model("resnet18", stem="cifar")) == 16


@pytest.mark.slow
@pytest.mark.parametrize(("name", "attention", "stem"),
                         [("resnet20", "cbam", "cifar"), ("resnet18", "bam", "imagenet")])
def test_torch_export_dynamic_batch_height_width(name: str, attention: str, stem: str) -> None:
    model = build(name, attention)
    program = export_program(model)
    module = program.module()
    check(lambda x: module(x), model, INPUTS[stem])


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_dynamic_batch_height_width(tmp_path: Path, dynamo: bool) -> None:
    model = build("resnet20", "cbam" if dynamo else "bam")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(model, tmp_path / "m.onnx", dynamo=dynamo)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one self-contained file
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # N, H, W symbolic; C fixed
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    check(lambda x: session.run(["logits"], {"image": x.numpy().astype(np.float32)})[0], model, INPUTS["cifar"])


def test_torchscript_trace() -> None:
    model = build("resnet20", "bam")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(model, check_trace=False)  # check() compares below, at other sizes
    with torch.jit.optimized_execution(False):  # skip the profiling executor's slow first runs
        check(lambda x: traced(x), model, INPUTS["cifar"])


# --------------------------------------------------------------------------------------- the CLI


def check_with_masks(run, checkpoint: Path, inputs: list[tuple[int, int, int]]) -> None:
    """``run(x)`` returns logits then one mask per attention module; each equals the eager model's."""
    model, _ = load_checkpoint(checkpoint)
    channels = model.conv1.in_channels
    for n, h, w in inputs:
        x = torch.randn(n, channels, h, w)
        with torch.inference_mode():
            logits, maps = model.forward_with_attention(x)
        got = [t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in run(x)]
        assert len(got) == 1 + len(maps)
        torch.testing.assert_close(got[0], logits, atol=1e-4, rtol=1e-4)
        for mask, attention_map in zip(got[1:], maps.values(), strict=True):
            torch.testing.assert_close(mask, attention_map.spatial, atol=1e-5, rtol=1e-4)


def expected_metadata(checkpoint: Path, outputs: list[str]) -> dict[str, object]:
    _, meta = load_checkpoint(checkpoint)
    preprocessing = json.loads(json.dumps(asdict(meta.preprocessing)))  # tuples as JSON lists
    return {"format": "macula.export", "class_names": meta.class_names, "preprocessing": preprocessing,
            "arch": meta.arch, "checkpoint_version": meta.version, "input": "image", "outputs": outputs}


def decoded(metadata: dict[str, str]) -> dict[str, object]:
    return {k: v if k in ("format", "checkpoint_version", "input") else json.loads(v) for k, v in metadata.items()}


def test_export_cli_has_a_real_help():
    result = subprocess.run([sys.executable, "-m", "models.export", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0
    assert "usage: python -m models.export" in result.stdout
    assert "{onnx,torchscript,exported-program}" in result.stdout and "--attention" in result.stdout


def test_export_cli_refuses_what_it_cannot_export(tmp_path, capsys):
    plain = make_checkpoint(tmp_path / "plain.safetensors", attention=None)
    assert main([str(plain), "--attention", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no attention modules" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    assert main([str(tmp_path / "missing.safetensors")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err


@pytest.mark.slow
def test_export_cli_onnx_with_masks_and_metadata(tmp_path, gray_checkpoint, capsys):
    out = tmp_path / "gray.onnx"
    assert main([str(gray_checkpoint), "--format", "onnx", "--out", str(out), "--attention"]) == 0
    assert str(out) in capsys.readouterr().out
    proto = onnx.load(str(out))
    modules = [f"layer{s}.{b}.cbam" for s in (1, 2, 3) for b in range(3)]
    assert [o.name for o in proto.graph.output] == ["logits", *modules]
    assert decoded({p.key: p.value for p in proto.metadata_props}) == expected_metadata(gray_checkpoint,
                                                                                          ["logits", *modules])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # N, H, W symbolic; C fixed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    check_with_masks(lambda x: session.run(None, {"image": x.numpy()}), gray_checkpoint, [(1, 40, 40), (3, 33, 57)])


@pytest.mark.slow
def test_export_cli_onnx_logits_only_by_default(tmp_path, rgb_checkpoint):
    assert main([str(rgb_checkpoint), "--out", str(tmp_path / "rgb.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "rgb.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == [f"class_{i}" for i in range(5)]
    model, _ = load_checkpoint(rgb_checkpoint)
    x = torch.randn(2, 3, 45, 36)
    with torch.inference_mode():
        torch.testing.assert_close(torch.as_tensor(session.run(None, {"image": x.numpy()})[0]), model(x),
                                   atol=1e-4, rtol=1e-4)


def test_export_cli_torchscript_with_masks(tmp_path, rgb_checkpoint):
    out = tmp_path / "rgb.pt"
    assert main([str(rgb_checkpoint), "--format", "torchscript", "--out", str(out), "--attention"]) == 0
    extra = {METADATA_FILE: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert decoded(json.loads(extra[METADATA_FILE])) == expected_metadata(rgb_checkpoint, ["logits", "bam1", "bam2"])
    with torch.jit.optimized_execution(False):
        check_with_masks(lambda x: loaded(x), rgb_checkpoint, [(1, 40, 40), (3, 33, 57)])


@pytest.mark.slow
def test_export_cli_exported_program_with_masks(tmp_path, rgb_checkpoint):
    out = tmp_path / "rgb.pt2"
    assert main([str(rgb_checkpoint), "--format", "exported-program", "--out", str(out), "--attention"]) == 0
    extra = {METADATA_FILE: ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert json.loads(json.loads(extra[METADATA_FILE])["outputs"]) == ["logits", "bam1", "bam2"]
    module = program.module()
    check_with_masks(lambda x: module(x), rgb_checkpoint, [(1, 40, 40), (3, 33, 57)])
