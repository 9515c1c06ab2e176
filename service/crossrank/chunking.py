"""A chunked passage's score from its windows' logits (pure functions; the windows themselves are
cut by the tokeniser, crossrank.tokenization)."""

from __future__ import annotations

from enum import StrEnum

import numpy as np


class Aggregation(StrEnum):
    MAX = "max"  # the best window: evidence anywhere in the passage counts
    FIRST = "first"  # the first window only (a truncated passage's score, scored alike)
    MEAN = "mean"  # the mean logit over the windows


def aggregate(
    logits: np.ndarray, owners: list[int], passages: int, how: Aggregation
) -> tuple[np.ndarray, np.ndarray]:
    """Per passage: its logit under ``how`` and the position (into ``logits``) of the window
    that scored it: the best window for max and mean, the first for first. ``owners`` gives
    each window's passage; a passage's windows are consecutive and every passage has one."""
    owner = np.asarray(owners, dtype=np.int64)
    starts = np.searchsorted(owner, np.arange(passages))
    counts = np.diff(np.append(starts, len(owner)))
    if np.any(counts == 0):
        raise ValueError("every passage needs at least one window")
    scores = logits.astype(np.float32)
    # The best window of each passage: sort by (passage, -logit); the first of each run wins.
    best = np.lexsort((np.arange(len(owner)), -scores, owner))[starts]
    if how is Aggregation.MAX:
        return scores[best], best
    if how is Aggregation.FIRST:
        return scores[starts], starts
    return (np.add.reduceat(scores, starts) / counts).astype(np.float32), best
