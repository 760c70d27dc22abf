"""LitServe peer: one worker, server-side batching, decode in ``decode_request``, batched ``predict``.

The request body is the raw JPEG (``Content-Type: image/jpeg``), declared to FastAPI as a ``bytes`` body so
LitServe hands the bytes to ``decode_request`` unchanged. No ``from __future__ import annotations`` here:
LitServe reads the annotation of ``decode_request`` at run time to type its endpoint.

    python -m bench.servers.litserve_server --checkpoint model.safetensors --port 8102 \
        --max-batch-size 8 --batch-timeout-ms 5
"""

import argparse
from typing import Annotated

import litserve as ls
import torch
from fastapi import Body

from bench.servers.common import Classifier

JpegBody = Annotated[bytes, Body(media_type="image/jpeg")]


class MaculaLitAPI(ls.LitAPI):
    def __init__(self, checkpoint: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.checkpoint = checkpoint

    def setup(self, device: str) -> None:
        self.classifier = Classifier(self.checkpoint)

    def decode_request(self, request: JpegBody) -> torch.Tensor:
        return self.classifier.preprocess(request)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.probabilities(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probs: torch.Tensor) -> dict:
        return self.classifier.answer(probs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    api = MaculaLitAPI(args.checkpoint, max_batch_size=args.max_batch_size,
                       batch_timeout=args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
