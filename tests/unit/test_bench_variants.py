"""The bench's peer and variant scripts: what they find and how they put scores back in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.side_by_side import st_exports
from bench.variant_speed import score
from crossrank.model.collate import PaddedBatch
from crossrank.model.tokenization import EncodedPair


def test_st_exports_finds_each_export_sentence_transformers_wrote(tmp_path: Path) -> None:
    for name in (
        "onnx/model.onnx",
        "onnx/model_O3.onnx",
        "onnx/model_quint8_avx2.onnx",
        "onnx/model_qint8_avx512_vnni.onnx",
        "openvino/openvino_model.xml",
        "openvino/openvino_model_qint8_quantized.xml",
        "model.safetensors",
    ):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    assert st_exports(tmp_path) == {
        "onnx": ("onnx", None),
        "onnx O3": ("onnx", "onnx/model_O3.onnx"),
        "onnx qint8_avx512_vnni": ("onnx", "onnx/model_qint8_avx512_vnni.onnx"),
        "onnx quint8_avx2": ("onnx", "onnx/model_quint8_avx2.onnx"),
        "openvino": ("openvino", None),
        "openvino qint8_quantized": ("openvino", "openvino/openvino_model_qint8_quantized.xml"),
    }
    assert st_exports(tmp_path / "absent") == {}


class FirstToken:
    """Scores a pair by its first token id, batch by batch."""

    provider = "test"
    uses_token_type_ids = False

    def __init__(self) -> None:
        self.batches: list[int] = []

    def run(self, batch: PaddedBatch) -> np.ndarray:
        self.batches.append(batch.input_ids.shape[1])
        return batch.input_ids[:, 0].astype(np.float32)


def test_score_batches_longest_first_and_returns_the_pairs_order() -> None:
    lengths = [3, 9, 1, 7, 5]
    pairs = [
        EncodedPair(np.arange(100 + i, 100 + i + n), np.zeros(n, np.int64))
        for i, n in enumerate(lengths)
    ]
    engine = FirstToken()
    scores = score(engine, pairs, batch_tokens=16)
    np.testing.assert_array_equal(scores, [100, 101, 102, 103, 104])
    # Length-sorted, at most 16 padded tokens a batch: [9], [7, 5], [3, 1].
    assert engine.batches == [9, 7, 3]
