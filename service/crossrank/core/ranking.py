"""A request's answer: its passages ranked by logit and the scores a client sees; and its
trace: what it cost, step by step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from crossrank.model.model_dir import Activation, Calibration, sigmoid

if TYPE_CHECKING:
    from crossrank.core.queue import Queued


@dataclass(slots=True)
class Trace:
    """What a request got to and what each step cost, recorded by the pipeline as it goes (so a
    request that fails midway still reports what it reached) for its caller to log and measure.
    None: the step was not reached (queue and inference also when the cache answered all)."""

    passages: int | None = None
    tokens: int | None = None
    tokenize_ms: float | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None
    # When tokenisation and queueing began (monotonic seconds): the spans of a trace.
    tokenize_at: float | None = None
    queue_at: float | None = None
    batches: int | None = None  # batches its pairs went in
    padded_tokens: int | None = None  # its pairs' padded tokens in them

    def queued(self, queued: Queued) -> None:
        self.queue_ms, self.inference_ms = 1000 * queued.queue_s, 1000 * queued.inference_s
        self.batches, self.padded_tokens = queued.batches, queued.padded_tokens


@dataclass(frozen=True, slots=True)
class Ranked:
    order: np.ndarray  # passage indices, best first
    scores: np.ndarray  # score of each passage, by index
    pairs: int  # passages scored
    tokens: int
    truncated: int
    chunks: int  # pairs sent to the model: windows when chunked
    # Budgeted requests only: which passages were scored in time (the others' scores mean
    # nothing, and they follow the scored ones in the order sent).
    scored: np.ndarray | None = None
    # Chunked: per passage, the window that scored it (number, first char, one past its last).
    spans: list[tuple[int, int, int]] | None = None

    def span(self, index: int) -> dict[str, int] | None:
        if self.spans is None:
            return None
        chunk, start, end = self.spans[index]
        return {"chunk": chunk, "start": start, "end": end}

    @property
    def unscored(self) -> int:
        return 0 if self.scored is None else int((~self.scored).sum())

    def is_scored(self, index: int) -> bool:
        return self.scored is None or bool(self.scored[index])

    def best(self, limit: int | None, min_score: float | None = None) -> list[tuple[int, float]]:
        """(index, score) of the best ``limit`` passages (all when None) best first, the
        unscored ones of a budgeted request last; with ``min_score``, only scored passages
        scoring at least that."""
        order = self.order.tolist()
        if min_score is not None:
            order = [i for i in order if self.is_scored(i) and self.scores[i] >= min_score]
        return [(index, float(self.scores[index])) for index in order[:limit]]


def rank(logits: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Indices by logit descending, ties by index ascending (a stable, reproducible order);
    with ``known``, the known ones so, then the others by index (the order sent)."""
    index = np.arange(logits.shape[0])
    if known is None:
        return np.lexsort((index, -logits))
    return np.lexsort((index, np.where(known, -logits, 0.0), ~known))


@dataclass(frozen=True, slots=True)
class ScoreScale:
    """What a client sees of a logit: the logit when it asks for it, else the calibrated
    probability, else (an uncalibrated model) the model's own activation of the logit."""

    activation: Activation
    calibration: Calibration | None

    def scores(self, logits: np.ndarray, raw_scores: bool) -> np.ndarray:
        if raw_scores:
            return logits
        if self.calibration is not None:
            return self.calibration.probability(logits)
        if self.activation is Activation.IDENTITY:
            return logits
        return sigmoid(logits)
