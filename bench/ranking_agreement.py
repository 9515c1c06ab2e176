"""Do two servers rank the same candidates alike? Per-query top-10 overlap, Kendall tau and the
largest |score difference|, over score arrays of the same candidates in the same order.

This runs in the GPU check kit's venv, which has the service's dependencies and no training
package, so it cannot import ``crossrank_train.agreement`` (scipy, ir_measures); its thresholds
are the export gates' (``crossrank_train.agreement.THRESHOLDS``, and a test keeps them equal).
scipy's Kendall tau is used when scipy is importable; otherwise an exact tau-b in numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

TOP_K = 10


@dataclass(frozen=True)
class Thresholds:
    min_top10_overlap: float
    min_kendall_tau: float


# The export's gates against fp32 (crossrank_train/agreement.py says why these numbers): a
# comparison with an int8 side is held to the int8 gate, any other (fp16 vs fp16, fp16 vs fp32,
# a variant against itself) to the fp16 gate.
THRESHOLDS = {
    "int8": Thresholds(min_top10_overlap=0.75, min_kendall_tau=0.8),
    "fp16": Thresholds(min_top10_overlap=0.9, min_kendall_tau=0.95),
}


def thresholds_for(*variants: str) -> Thresholds:
    return THRESHOLDS["int8" if "int8" in variants else "fp16"]


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Kendall tau-b (ties in either list corrected for), O(n^2): the candidate lists here
    have at most the service's 1,000 passages. nan when either list is constant."""
    upper = np.triu_indices(len(x), k=1)
    sx = np.sign(np.subtract.outer(x, x)[upper])
    sy = np.sign(np.subtract.outer(y, y)[upper])
    pairs_x, pairs_y = np.count_nonzero(sx), np.count_nonzero(sy)
    if pairs_x == 0 or pairs_y == 0:
        return float("nan")
    return float(np.sum(sx * sy) / np.sqrt(float(pairs_x) * float(pairs_y)))


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    try:
        from scipy.stats import kendalltau
    except ImportError:
        return kendall_tau_b(x, y)
    return float(kendalltau(x, y).statistic)


def _top(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


@dataclass(frozen=True)
class Agreement:
    queries: int
    top10_overlap: float  # mean over queries of |top10(reference) & top10(candidate)| / 10
    worst_top10_overlap: float
    kendall_tau: float  # mean over queries whose tau is defined
    worst_kendall_tau: float
    max_abs_diff: float  # over every candidate of every query
    mean_abs_diff: float

    def meets(self, gate: Thresholds) -> bool:
        """nan misses (a constant list has no order to agree on)."""
        return bool(
            self.top10_overlap >= gate.min_top10_overlap
            and self.kendall_tau >= gate.min_kendall_tau
        )

    def as_record(self) -> dict[str, float | int]:
        return asdict(self)


def ranking_agreement(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> Agreement:
    """Per-query score arrays of two systems over the same candidates, in the same order."""
    overlaps, taus, diffs = [], [], []
    for ref, cand in zip(reference, candidate, strict=True):
        ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
        if ref.shape != cand.shape:
            raise ValueError(f"score lists of different lengths: {ref.shape} vs {cand.shape}")
        k = min(TOP_K, len(ref))
        overlaps.append(len(_top(ref, k) & _top(cand, k)) / k)
        tau = kendall_tau(ref, cand) if len(ref) > 1 else float("nan")
        if not np.isnan(tau):
            taus.append(tau)
        diffs.append(np.abs(ref - cand))
    every = np.concatenate(diffs)
    return Agreement(
        queries=len(overlaps),
        top10_overlap=float(np.mean(overlaps)),
        worst_top10_overlap=float(np.min(overlaps)),
        kendall_tau=float(np.mean(taus)) if taus else float("nan"),
        worst_kendall_tau=min(taus, default=float("nan")),
        max_abs_diff=float(every.max()),
        mean_abs_diff=float(every.mean()),
    )
