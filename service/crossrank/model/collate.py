"""Padding a batch of encoded pairs into the engine's input arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crossrank.model.tokenization import EncodedPair


@dataclass(frozen=True, slots=True)
class PaddedBatch:
    input_ids: np.ndarray  # int64 [pairs, padded_length]
    attention_mask: np.ndarray  # int64 [pairs, padded_length]
    token_type_ids: np.ndarray  # int64 [pairs, padded_length]
    real_tokens: int

    @property
    def pairs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)


def pad_pairs(pairs: Sequence[EncodedPair]) -> PaddedBatch:
    """Right-pad to the longest pair. Pad positions hold id 0 under a zero attention mask, so
    their value never reaches a real token's output."""
    length = max(p.length for p in pairs)
    input_ids = np.zeros((len(pairs), length), dtype=np.int64)
    token_type_ids = np.zeros((len(pairs), length), dtype=np.int64)
    attention_mask = np.zeros((len(pairs), length), dtype=np.int64)
    real = 0
    for row, pair in enumerate(pairs):
        n = pair.length
        input_ids[row, :n] = pair.input_ids
        token_type_ids[row, :n] = pair.token_type_ids
        attention_mask[row, :n] = 1
        real += n
    return PaddedBatch(input_ids, attention_mask, token_type_ids, real)
