"""What most users deploy: sentence-transformers ``CrossEncoder.predict`` behind a minimal FastAPI
endpoint, one request at a time (no batching across requests), same request body as crossrank's
``/rerank``.

    python -m bench.peers.st_api CHECKPOINT THREADS DEVICE [--backend B] [--file-name F] PORT

``--backend`` is sentence-transformers' own: ``torch`` (fp32), ``onnx`` (onnxruntime through
optimum) or ``openvino`` (optimum-intel); ``--file-name`` picks one of the checkpoint's exports
(``onnx/model_O3.onnx``, ``onnx/model_qint8_avx2.onnx`` ... written by
``bench/peers/st_export.py``). The onnx and openvino backends need the peers' venv
(``bench/peers/st_setup.sh``); every backend runs ``THREADS`` intra-op threads.
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import CrossEncoder


class RerankRequest(BaseModel):
    query: str
    passages: list[str]


def backend_kwargs(backend: str, threads: int, file_name: str | None) -> dict[str, Any]:
    """The ``model_kwargs`` that give each backend the same threads (and the chosen export)."""
    kwargs: dict[str, Any] = {"file_name": file_name} if file_name else {}
    if backend == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        kwargs["session_options"] = options
    elif backend == "openvino":
        kwargs["ov_config"] = {"INFERENCE_NUM_THREADS": str(threads)}
    return kwargs


def create_app(
    checkpoint: str, device: str, backend: str, threads: int, file_name: str | None
) -> FastAPI:
    model = CrossEncoder(
        checkpoint,
        device=device,
        local_files_only=True,
        max_length=256,
        backend=backend,
        model_kwargs=backend_kwargs(backend, threads, file_name),
    )
    # One predict at a time: concurrent ones would each ask for every core.
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("threads", type=int)
    parser.add_argument("device")
    parser.add_argument("--backend", choices=("torch", "onnx", "openvino"), default="torch")
    parser.add_argument("--file-name", help="an export inside the checkpoint (onnx/openvino)")
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    app = create_app(args.checkpoint, args.device, args.backend, args.threads, args.file_name)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
