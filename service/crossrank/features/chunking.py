"""Long passages as windows: each passage over the model's window is cut into overlapping
windows (by :class:`crossrank.model.tokenization.WindowTokenizer`), every window is scored as a
pair, and the passage's score is aggregated from its windows' logits here (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Aggregation(StrEnum):
    MAX = "max"  # the best window: evidence anywhere in the passage counts
    FIRST = "first"  # the first window only (a truncated passage's score, scored alike)
    MEAN = "mean"  # the mean logit over the windows


@dataclass(frozen=True, slots=True)
class LongPassages:
    """How a request treats passages over the model's window: the server's defaults, each
    overridable per request (the stride is the server's: its tokenizer is built at start)."""

    chunk: bool
    aggregation: Aggregation
    max_chunks: int

    def override(
        self, mode: str | None, aggregation: str | None, max_chunks: int | None
    ) -> LongPassages:
        return LongPassages(
            self.chunk if mode is None else mode == "chunk",
            self.aggregation if aggregation is None else Aggregation(aggregation),
            self.max_chunks if max_chunks is None else max_chunks,
        )


def pair_bound(passages: int, max_chunks: int, max_pairs: int) -> int:
    """The most pairs ``passages`` chunked passages can make under a request's pair bound."""
    return min(passages * max_chunks, max_pairs)


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


def passage_scores(
    logits: np.ndarray,
    owners: list[int],
    spans: list[tuple[int, int]],
    passages: int,
    how: Aggregation,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Each passage's logit from its windows', and the window that scored it: (its number
    within the passage, its first character, one past its last)."""
    scores, best = aggregate(logits, owners, passages, how)
    first = np.searchsorted(np.asarray(owners), np.arange(passages))
    chosen = [(int(w - f), *spans[w]) for w, f in zip(best.tolist(), first.tolist(), strict=True)]
    return scores, chosen
