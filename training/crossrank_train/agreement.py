"""Ranking agreement between a reduced-precision variant and the fp32 graph: the export gate.

int8 and fp16 cannot match fp32 logits to 1e-4, and need not: the service only ranks. So they
are judged on what a client sees, the order of the candidates: the overlap of the top 10 and
Kendall's tau over each query's whole candidate list, averaged over the sample's queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import kendalltau

from crossrank_train.evaluate import EvalSet
from crossrank_train.groups import Group

TOP_K = 10


@dataclass(frozen=True)
class RankingCase:
    """One query and its candidates; ids only matter when the case comes with qrels."""

    qid: str
    query: str
    pids: list[str]
    passages: list[str]


def cases_from_eval_set(eval_set: EvalSet) -> list[RankingCase]:
    return [
        RankingCase(
            qid,
            query,
            list(eval_set.candidates[qid]),
            [eval_set.corpus[p] for p in eval_set.candidates[qid]],
        )
        for qid, query in eval_set.queries.items()
        if eval_set.candidates[qid]
    ]


def cases_from_groups(groups: Sequence[Group]) -> list[RankingCase]:
    """Training groups as cases, the groups of one query merged into one candidate list."""
    merged: dict[str, list[str]] = {}
    for group in groups:
        passages = merged.setdefault(group.query, [])
        passages.extend(p for p in group.passages if p not in passages)
    return [
        RankingCase(f"q{i}", query, [f"q{i}-{j}" for j in range(len(ps))], ps)
        for i, (query, ps) in enumerate(merged.items())
    ]


@dataclass(frozen=True)
class Thresholds:
    min_top10_overlap: float  # mean over queries of |top10(fp32) ∩ top10(variant)| / 10
    min_kendall_tau: float  # mean over queries


# Why these numbers: a cross-encoder's candidate lists are full of near-ties (BM25 top-100,
# most passages non-relevant, logits within hundredths of each other), and any perturbation
# swaps some of them, while a broken graph gives a random order (top-10 overlap ~0.1, tau ~0).
# Measured on the top 100 of 10 TREC DL 2021 and 10 SciFact test queries, for a MiniLM-L6
# cross-encoder trained briefly (80 LCE steps; a weak model, so more near-ties than usual):
# int8 kept a mean top-10 overlap of 0.87 (worst query 0.8) and a mean tau of 0.90-0.92 (worst
# 0.83), costing -0.03..+0.004 nDCG@10; fp16 kept 1.0 and 0.999, at identical nDCG@10. The
# gates sit a margin below those: int8 may reorder near-ties, fp16 should reorder next to nothing.
THRESHOLDS = {
    "int8": Thresholds(min_top10_overlap=0.75, min_kendall_tau=0.8),
    "fp16": Thresholds(min_top10_overlap=0.9, min_kendall_tau=0.95),
}


class AgreementError(RuntimeError):
    """A variant ranks the sample too differently from fp32 to be served in its place."""


@dataclass(frozen=True)
class Agreement:
    top10_overlap: float
    kendall_tau: float
    worst_top10_overlap: float
    worst_kendall_tau: float
    queries: int

    def as_record(self) -> dict[str, float | int]:
        return asdict(self)


def _top(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def ranking_agreement(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> Agreement:
    """Per-query score arrays of fp32 and a variant, over the same candidates in order."""
    overlaps, taus = [], []
    for ref, cand in zip(reference, candidate, strict=True):
        k = min(TOP_K, len(ref))
        overlaps.append(len(_top(ref, k) & _top(cand, k)) / k)
        # A list of one passage, or constant scores, has no order: tau is nan, and such queries
        # are left out of the mean.
        tau = kendalltau(ref, cand).statistic if len(ref) > 1 else np.nan
        if not np.isnan(tau):
            taus.append(float(tau))
    return Agreement(
        float(np.mean(overlaps)),
        float(np.mean(taus)) if taus else float("nan"),
        float(np.min(overlaps)),
        min(taus, default=float("nan")),
        len(overlaps),
    )


def check_agreement(variant: str, agreement: Agreement) -> None:
    """Raise AgreementError when ``variant`` misses its thresholds (nan misses them too)."""
    gate = THRESHOLDS[variant]
    failures = []
    if not agreement.top10_overlap >= gate.min_top10_overlap:
        failures.append(
            f"mean top-10 overlap {agreement.top10_overlap:.3f} < {gate.min_top10_overlap}"
        )
    if not agreement.kendall_tau >= gate.min_kendall_tau:
        failures.append(f"mean Kendall tau {agreement.kendall_tau:.3f} < {gate.min_kendall_tau}")
    if failures:
        raise AgreementError(
            f"the {variant} variant ranks {agreement.queries} sample queries too differently "
            f"from fp32: {'; '.join(failures)}. Export without it (--variants) or check the "
            "sample (a model that cannot tell the candidates apart has no ranking to keep)"
        )
