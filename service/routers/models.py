"""What is served: name, version, architecture, attention, classes, input, training summary, and how it runs
(precision, serving form, batch cap and memory format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import ServiceDep
from ..errors import responses
from ..inference import ModelRunner

router = APIRouter(prefix="/v1", tags=["models"])


def describe(runner: ModelRunner) -> dict[str, Any]:
    meta = runner.meta
    pre = meta.preprocessing
    return {"name": runner.name, "version": meta.version, "arch": meta.arch["name"],
            "attention": meta.arch.get("attention"), "num_classes": meta.num_classes, "classes": meta.class_names,
            "input_size": list(pre.input_size), "color": pre.color, "precision": runner.precision,
            "serving_form": runner.serving_form, "max_batch_size": runner.max_batch_size,
            "memory_format": runner.memory_format_name, "tuning": dict(runner.tuning),
            "attention_modules": list(runner.attention_modules) if runner.has_attention else [],
            "preprocessing": {"resize_mode": pre.resize_mode, "resize_size": pre.resize_size,
                              "mean": list(pre.mean), "std": list(pre.std)},
            "training": meta.training}


@router.get("/models", summary="Every served model", responses=responses(401))
async def list_models(service: ServiceDep) -> dict[str, Any]:
    return {"default": service.default_model, "models": [describe(r) for r in service.runners.values()]}


@router.get("/models/{name}", summary="One served model", responses=responses(401, 404))
async def get_model(service: ServiceDep, name: str) -> dict[str, Any]:
    return describe(service.runner(name))
