"""The systems under test, each started as its own server process on a free loopback port."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bench.service_bench import Server
from bench.workload import Request

PEERS = Path(__file__).parent / "peers"


def _passages_body(request: Request) -> dict:
    return {"query": request.query, "passages": request.passages}


def _infinity_body(request: Request) -> dict:
    # raw_scores: the logits, as crossrank returns with the identity activation.
    return {"query": request.query, "documents": request.passages, "raw_scores": True}


def crossrank(
    model: Path,
    threads: int,
    flags: Sequence[str] = (),
    device: str = "cpu",
    log: Path | None = None,
    start_timeout_s: float = 600,
) -> Server:
    command = [sys.executable, "-m", "crossrank.cli", "serve", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--threads", str(threads), "--device", device]
    command += [*flags, "--port"]
    return Server(
        "crossrank",
        command,
        rerank_path="/rerank",
        body=_passages_body,
        ready_path="/ready",
        log=log,
        start_timeout_s=start_timeout_s,
    )


def st_api(
    checkpoint: Path,
    threads: int,
    device: str = "cpu",
    backend: str = "torch",
    file_name: str | None = None,
    python: Path | None = None,
) -> Server:
    """sentence-transformers CrossEncoder.predict behind a minimal FastAPI endpoint; the onnx and
    openvino backends run in the peers' venv (``python``: bench/peers/st_setup.sh)."""
    command = [str(python or sys.executable), "-m", "bench.peers.st_api", str(checkpoint)]
    command += [str(threads), device, "--backend", backend]
    command += ["--file-name", file_name] if file_name else []
    return Server(
        "sentence-transformers + FastAPI",
        command,
        rerank_path="/rerank",
        body=_passages_body,
        ready_path="/ready",
    )


def infinity(checkpoint: Path, threads: int, device: str = "cpu", engine: str = "torch") -> Server:
    """Infinity (infinity-emb, its own venv: bench/peers/infinity_setup.sh) on the checkpoint,
    with its torch or its optimum (onnxruntime) engine."""
    command = ["bash", str(PEERS / "infinity_serve.sh"), str(checkpoint)]
    return Server(
        "Infinity",
        command,
        rerank_path="/rerank",
        body=_infinity_body,
        ready_path="/health",
        # On a GPU Infinity runs fp16, as crossrank's fp16 variant does.
        env={
            "OMP_NUM_THREADS": str(threads),
            "INFINITY_PEER_DEVICE": device,
            "INFINITY_PEER_DTYPE": "float16" if device == "cuda" else "float32",
            "INFINITY_PEER_ENGINE": engine,
        },
    )
