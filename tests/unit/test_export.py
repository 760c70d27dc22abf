"""Exported models (torch.export, ONNX via onnxruntime, TorchScript trace) equal eager at other sizes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import create_model
from models.export import export_onnx, export_program, min_input_size, trace

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
