"""Engine level: pairs/s of the bare onnxruntime session, against this CPU's matmul roofline.

FLOPs of one pair of L tokens through a BERT encoder (hidden h, intermediate i, n layers), counting
a multiply-add as 2 FLOPs and ignoring softmax, norms and activations (under 1%):

    per layer: 2*L*(4*h^2 + 2*h*i)   projections Q, K, V, O and the two FFN matrices
             + 2*2*L^2*h             attention scores QK^T and the weighted sum over V
    pair:      n x per layer

MiniLM-L6 (h=384, i=1536, n=6) at L=180: 6 x (2*180*(589,824 + 1,179,648) + 4*180^2*384)
≈ 4.12 GFLOP per pair (`pair_flops(180, Shape())`). The roofline is the fp32 matmul rate
measured in the same run, on matrices of the encoder's shapes (a [B*L, h] x [h, i] product),
with the same threads.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from crossrank.model.collate import PaddedBatch, pad_pairs
from crossrank.model.engine import OnnxEngine, plan_session
from crossrank.model.model_dir import ModelDir
from crossrank.model.tokenization import EncodedPair


@dataclass(frozen=True)
class Shape:
    hidden: int = 384
    intermediate: int = 1536
    layers: int = 6


def pair_flops(length: int, shape: Shape) -> float:
    h, i = shape.hidden, shape.intermediate
    per_layer = 2 * length * (4 * h * h + 2 * h * i) + 4 * length * length * h
    return float(shape.layers * per_layer)


def matmul_peak(threads: int, shape: Shape, seconds: float = 3.0) -> float:
    """fp32 GFLOP/s of onnxruntime's MatMul on the encoder's FFN shape."""
    from onnx import TensorProto, helper

    m, k, n = 4096, shape.hidden, shape.intermediate
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    session.run(None, {"a": a, "b": b})
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"a": a, "b": b})
        runs += 1
    return 2.0 * m * k * n * runs / (time.perf_counter() - start) / 1e9


@dataclass(frozen=True)
class EngineResult:
    variant: str
    order: str
    pairs: int
    seconds: float
    real_tokens: int
    padded_tokens: int
    gflops: float  # on the real (unpadded) tokens

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds


def make_batches(pairs: Sequence[EncodedPair], batch_tokens: int, sort: bool) -> list[PaddedBatch]:
    """Consecutive pairs (longest first when ``sort``) in padded batches of at most
    ``batch_tokens`` tokens: a bare loop over the session, without the service's scheduler."""
    order = sorted(pairs, key=lambda p: -p.length) if sort else list(pairs)
    batches, current = [], []
    for pair in order:
        padded = max([p.length for p in current] + [pair.length]) * (len(current) + 1)
        if current and padded > batch_tokens:
            batches.append(pad_pairs(current))
            current = []
        current.append(pair)
    batches.append(pad_pairs(current))
    return batches


def run_engine(
    model: ModelDir,
    variant: str,
    pairs: Sequence[EncodedPair],
    *,
    threads: int,
    batch_tokens: int,
    sort: bool,
    shape: Shape,
    repeats: int = 1,
    device: str = "cpu",
) -> EngineResult:
    """The pairs in batches of at most ``batch_tokens`` padded tokens; the median of ``repeats``
    timed passes (the machine is shared: one pass can be off by 20%)."""
    plan = plan_session(device, ort.get_available_providers(), threads=threads)
    engine = OnnxEngine(model.variant_path(variant), plan)
    batches = make_batches(pairs, batch_tokens, sort)
    engine.run(batches[0])  # warm
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            engine.run(batch)
        passes.append(time.perf_counter() - start)
    seconds = statistics.median(passes)
    flops = sum(pair_flops(p.length, shape) for p in pairs)
    return EngineResult(
        variant,
        "length-sorted" if sort else "unsorted",
        len(pairs),
        seconds,
        sum(b.real_tokens for b in batches),
        sum(b.padded_tokens for b in batches),
        flops / seconds / 1e9,
    )
