"""Model inputs built exactly as the service builds them: crossrank's PairTokenizer, then
crossrank's padding, then torch tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from crossrank.model.collate import PaddedBatch, pad_pairs
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.groups import Group


def batch_feeds(batch: PaddedBatch, token_types: bool) -> dict[str, np.ndarray]:
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if token_types:
        feeds["token_type_ids"] = batch.token_type_ids
    return feeds


def to_tensors(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in feeds.items()}


def encode_groups(
    tokenizer: PairTokenizer, groups: Sequence[Group], token_types: bool
) -> dict[str, torch.Tensor]:
    """Inputs for ``len(groups) * (1 + k)`` pairs, group by group, each positive first."""
    pairs = [pair for g in groups for pair in tokenizer.encode(g.query, g.passages).pairs]
    return to_tensors(batch_feeds(pad_pairs(pairs), token_types))
