"""The no-batching baseline: a FastAPI endpoint that decodes, preprocesses and runs the model per request.

This is what a typical user writes first: one uvicorn worker, the blocking work pushed to the thread pool so
the event loop stays free (``run_in_threadpool``), no batching, no thread tuning.

    python -m bench.servers.naive_fastapi --checkpoint model.safetensors --port 8101
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from PIL import UnidentifiedImageError

from bench.servers.common import Classifier


def create_app(checkpoint: str) -> FastAPI:
    classifier = Classifier(checkpoint)
    app = FastAPI(title="naive baseline")

    def predict_one(data: bytes) -> dict:
        try:
            x = classifier.preprocess(data)
        except (UnidentifiedImageError, OSError) as exc:
            raise HTTPException(422, detail=f"undecodable image: {exc}") from exc
        return classifier.classify(x.unsqueeze(0))[0]

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        return await run_in_threadpool(predict_one, await request.body())

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.checkpoint), host=args.host, port=args.port, workers=1, log_level="warning")


if __name__ == "__main__":
    main()
