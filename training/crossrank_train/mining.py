"""Hard-negative mining: a first stage's hits in a rank window (BM25, or a bi-encoder for the
negatives it gets wrong), minus judged positives, plus a few random passages, grouped with each
positive for listwise (LCE) training."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from tqdm import tqdm

from crossrank_train.bm25 import Bm25Index
from crossrank_train.groups import Group
from crossrank_train.readers import Collection, Run
from crossrank_train.scoring import Scorer


class Retriever(Protocol):
    def search(self, queries: dict[str, str], k: int) -> Run: ...


@dataclass(frozen=True)
class MiningConfig:
    negatives: int = 7  # per group: LCE's k
    random_negatives: int = 1  # of those, drawn uniformly from the corpus
    # First-stage hits [start:end] are the hard-negative pool. The very top is skipped because it
    # is where unjudged relevant passages (false negatives) concentrate.
    window: tuple[int, int] = (10, 100)
    min_grade: int = 1  # a judgement at or above this grade makes a passage a positive
    seed: int = 0

    def __post_init__(self) -> None:
        start, end = self.window
        if not 0 <= start < end:
            raise ValueError(f"the rank window {self.window} must satisfy 0 <= start < end")
        if not 0 <= self.random_negatives <= self.negatives:
            raise ValueError("random_negatives must be between 0 and negatives")


def _random_pids(rng: random.Random, pids: list[str], k: int, excluded: set[str]) -> list[str]:
    # Drawing k + |excluded| distinct passages leaves at least k outside `excluded` without
    # scanning the whole corpus for every group.
    drawn = rng.sample(pids, min(len(pids), k + len(excluded)))
    return [pid for pid in drawn if pid not in excluded][:k]


def mine_groups(
    collection: Collection, config: MiningConfig, index: Retriever | None = None
) -> Iterator[Group]:
    """One group per judged positive of every query in ``collection.queries``."""
    rng = random.Random(config.seed)
    corpus = collection.corpus
    pids = list(corpus)
    positives = {
        qid: [
            pid
            for pid, grade in collection.qrels.get(qid, {}).items()
            if grade >= config.min_grade and pid in corpus
        ]
        for qid in collection.queries
    }
    queries = {qid: text for qid, text in collection.queries.items() if positives[qid]}
    index = index or Bm25Index(corpus)
    run = index.search(queries, config.window[1])
    start, end = config.window
    hard = config.negatives - config.random_negatives
    for qid, query in tqdm(queries.items(), desc="mining", unit="query"):
        judged = set(positives[qid])
        # Duplicated passages (same text, other id) of a positive are not negatives either.
        positive_texts = {corpus[pid] for pid in judged}
        ranked = sorted(run[qid], key=run[qid].__getitem__, reverse=True)[start:end]
        pool = [p for p in ranked if p not in judged and corpus[p] not in positive_texts]
        for pid in positives[qid]:
            chosen = rng.sample(pool, min(hard, len(pool)))
            chosen += _random_pids(rng, pids, config.negatives - len(chosen), judged | set(chosen))
            yield Group(query, corpus[pid], [corpus[p] for p in chosen])


def add_teacher_scores(groups: Iterable[Group], teacher: Scorer) -> Iterator[Group]:
    """The groups with a teacher's logits for [positive, *negatives] (for MarginMSE)."""
    for group in tqdm(groups, desc="teacher scoring", unit="group"):
        scores = teacher.score(group.query, group.passages)
        yield Group(group.query, group.positive, group.negatives, [float(s) for s in scores])
