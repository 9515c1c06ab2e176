"""What most users deploy: sentence-transformers ``CrossEncoder.predict`` behind a minimal FastAPI
endpoint, one request at a time (no batching across requests), same request body as crossrank's
``/rerank``.

    python -m bench.peers.st_api CHECKPOINT THREADS DEVICE PORT
"""

from __future__ import annotations

import sys
import threading

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import CrossEncoder


class RerankRequest(BaseModel):
    query: str
    passages: list[str]


def create_app(checkpoint: str, device: str) -> FastAPI:
    model = CrossEncoder(checkpoint, device=device, local_files_only=True, max_length=256)
    # One predict at a time: concurrent ones would each ask torch for every core.
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/rerank")
    def rerank(request: RerankRequest) -> dict:  # sync: FastAPI runs it in its thread pool
        with lock:
            scores = model.predict([(request.query, p) for p in request.passages], batch_size=32)
        order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
        return {"results": [{"index": i, "score": float(scores[i])} for i in order]}

    return app


def main() -> None:
    checkpoint, threads, device, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(threads)
    uvicorn.run(create_app(checkpoint, device), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
