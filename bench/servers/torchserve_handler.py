"""TorchServe peer: a custom handler that loads the Macula checkpoint through safetensors (no pickle).

TorchServe batches on its side (``batchSize``, ``maxBatchDelay`` in the model config) and calls ``handle`` with
one row per request; each row's ``body`` is the raw JPEG. This file is packed into the model archive by
``bench/servers/torchserve_setup.py``; the worker imports ``models`` and ``bench`` from ``PYTHONPATH``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.servers.common import Classifier


class MaculaHandler:
    def __init__(self) -> None:
        self.classifier: Classifier | None = None

    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        checkpoint = next(model_dir.glob("*.safetensors"))
        self.classifier = Classifier(checkpoint)

    def handle(self, data: list[dict], context) -> list[dict]:
        images = [self.classifier.preprocess(bytes(row.get("body") or row.get("data"))) for row in data]
        return self.classifier.classify(torch.stack(images))


_service = MaculaHandler()


def handle(data, context):
    """TorchServe's module-level entry point: initialise once, then one call per batch."""
    if _service.classifier is None:
        _service.initialize(context)
    return None if data is None else _service.handle(data, context)
