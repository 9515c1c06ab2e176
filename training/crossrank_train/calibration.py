"""Calibration: a map from a model's logit to the probability that the passage is relevant.

Platt scaling (a logistic regression on the one logit) rather than isotonic regression: it is
strictly increasing, so the probabilities keep the logits' order and break no ties (isotonic
regression is a step function: it maps whole ranges of logits to one value, and a client sorting
or thresholding by probability would lose the order within them); its two parameters are fitted
well by a few thousand judged pairs, where isotonic steps over-fit the sparse high-logit end.

Labels come from a judged re-ranking set: every first-stage candidate of a judged query is a pair,
relevant when its qrels grade is above 0, not relevant otherwise (unjudged included), which is the
population the service scores: the candidates a retriever hands it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import CalibrationDisplay
from sklearn.linear_model import LogisticRegression

from crossrank.model.model_dir import Calibration
from crossrank_train.evaluate import EvalSet
from crossrank_train.scoring import Scorer

DEFAULT_BINS = 10


@dataclass(frozen=True)
class LabelledLogits:
    logits: np.ndarray  # float64, one per (query, candidate) pair
    labels: np.ndarray  # 1 relevant, 0 not

    @property
    def positives(self) -> int:
        return int(self.labels.sum())


class CalibrationError(ValueError):
    """The labelled set cannot give a calibration (no positives, or logits that do not rise
    with relevance)."""


def labelled_logits(scorer: Scorer, eval_set: EvalSet) -> LabelledLogits:
    """The scorer's logit and the qrels' label of every candidate pair of the set."""
    logits: list[float] = []
    labels: list[int] = []
    for qid, query in eval_set.queries.items():
        pids = list(eval_set.candidates[qid])
        if not pids:
            continue
        scores = scorer.score(query, [eval_set.corpus[p] for p in pids])
        judged = eval_set.qrels.get(qid, {})
        logits += [float(s) for s in scores]
        labels += [int(judged.get(p, 0) > 0) for p in pids]
    return LabelledLogits(np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64))


def fit_platt(data: LabelledLogits, fitted_on: str, variant: str) -> Calibration:
    """Platt scaling: logistic regression of the label on the logit, unregularised but with
    Platt's smoothed targets."""
    if data.positives == 0 or data.positives == len(data.labels):
        raise CalibrationError(
            f"the set has {data.positives} relevant pairs of {len(data.labels)}: a calibration "
            "needs both relevant and non-relevant pairs"
        )
    # Platt's (1999) targets: (N+ + 1)/(N+ + 2) for a relevant pair, 1/(N- + 2) for the others,
    # so that a set the logit separates perfectly still gives a finite slope. Soft targets as
    # sample weights: each pair once as relevant (weight t) and once as not (weight 1 - t).
    positives, negatives = data.positives, len(data.labels) - data.positives
    targets = np.where(data.labels > 0, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    x = np.concatenate([data.logits, data.logits]).reshape(-1, 1)
    y = np.concatenate([np.ones_like(data.labels), np.zeros_like(data.labels)])
    weights = np.concatenate([targets, 1.0 - targets])
    model = LogisticRegression(C=np.inf).fit(x, y, sample_weight=weights)
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope <= 0:
        raise CalibrationError(
            f"on {fitted_on} relevance does not rise with the logit (fitted slope {slope:.4g}): "
            "no order-keeping calibration exists"
        )
    return Calibration(
        slope=slope,
        intercept=intercept,
        fitted_on=fitted_on,
        variant=variant,
        pairs=len(data.labels),
        positives=data.positives,
    )


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS
) -> float:
    """ECE over ``bins`` equal-width bins of [0, 1]: the pair-weighted mean, over bins, of
    |mean predicted probability - fraction relevant|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds [edges[i], edges[i+1]), the last one closed at 1.
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            gap = abs(probabilities[inside].mean() - labels[inside].mean())
            total += inside.sum() * gap
    return float(total / len(labels))


def reliability_diagram(
    probabilities: np.ndarray, labels: np.ndarray, path: Path, title: str, bins: int
) -> Path:
    """A PNG of fraction relevant against mean predicted probability, per equal-width bin,
    with the histogram of predictions under it."""
    # A bare Figure, not pyplot: no backend, no global state (as report.py).
    figure = Figure(figsize=(5, 6))
    top, bottom = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    CalibrationDisplay.from_predictions(labels, probabilities, n_bins=bins, ax=top, name="model")
    top.set_title(title, fontsize=9)
    bottom.hist(probabilities, bins=np.linspace(0, 1, bins + 1), color="grey")
    bottom.set_yscale("log")
    bottom.set_xlabel("predicted probability of relevance")
    bottom.set_ylabel("pairs")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
