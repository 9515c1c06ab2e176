"""Tiny generated relevance data for the training tests: planted signals a few steps learn."""

from __future__ import annotations

import random

from support import WORDS

from crossrank_train.agreement import RankingCase
from crossrank_train.groups import Group

MAX_LENGTH = 64
MAX_QUERY_TOKENS = 16
GRADED_LEVELS = 15  # marker counts 0..14: more candidates than a top 10
# A passage's relevance is how often it says "relevant"; nothing else in the data carries any.
MARKER = "relevant"
FILLER = [w for w in WORDS if w != MARKER]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.sample(FILLER, n))


def _passage(rng: random.Random, markers: int) -> str:
    words = rng.sample(FILLER, 8) + [MARKER] * markers
    rng.shuffle(words)
    return " ".join(words)


def planted_groups(count: int, negatives: int, seed: int) -> list[Group]:
    """The positive says the marker once, no negative does; the teacher scores 5 vs 0."""
    rng = random.Random(seed)
    return [
        Group(
            query=_words(rng, 3),
            positive=_passage(rng, 1),
            negatives=[_passage(rng, 0) for _ in range(negatives)],
            teacher_scores=[5.0] + [0.0] * negatives,
        )
        for _ in range(count)
    ]


def graded_groups(count: int, negatives: int, seed: int, levels: int) -> list[Group]:
    """Passages with distinct marker counts below ``levels``; the teacher scores the count."""
    rng = random.Random(seed)
    groups = []
    for _ in range(count):
        grades = sorted(rng.sample(range(levels), negatives + 1), reverse=True)
        passages = [_passage(rng, g) for g in grades]
        groups.append(Group(_words(rng, 3), passages[0], passages[1:], [float(g) for g in grades]))
    return groups


def graded_cases(queries: int, levels: int, seed: int) -> list[RankingCase]:
    """Queries whose ``levels`` candidates have marker counts 0 .. levels-1, shuffled: a model
    that learnt to count has a definite order for them, and no ties."""
    rng = random.Random(seed)
    return [
        RankingCase(
            qid=f"q{i}",
            query=_words(rng, 3),
            pids=[f"q{i}-d{j}" for j in range(levels)],
            passages=[_passage(rng, g) for g in rng.sample(range(levels), levels)],
        )
        for i in range(queries)
    ]
