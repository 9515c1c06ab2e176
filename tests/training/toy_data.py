"""Tiny generated relevance data for the training tests: planted signals a few steps learn."""

from __future__ import annotations

import random

from support import WORDS

from crossrank_train.agreement import RankingCase
from crossrank_train.groups import Group
from crossrank_train.readers import Collection

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


CAT_DOG_FILLER = [w for w in WORDS if w not in ("cat", "dog")]


def cat_dog_collection() -> Collection:
    """A small corpus for mining: q1 (cat dog) with a strong and a weak positive, q2 judged
    only on noise, q3 not judged."""
    rng = random.Random(0)
    corpus = {
        "top": "cat dog cat dog",
        "copy-of-top": "cat dog cat dog",  # unjudged duplicate of a positive
        "weak": "cat " + " ".join(rng.choices(CAT_DOG_FILLER, k=30)),  # a positive BM25 ranks low
    }
    for i in range(30):
        matches = ["cat"] * rng.randint(1, 3) + ["dog"] * rng.randint(0, 3)
        corpus[f"m{i}"] = " ".join(matches + rng.choices(CAT_DOG_FILLER, k=rng.randint(3, 12)))
    for i in range(20):
        corpus[f"z{i}"] = " ".join(rng.choices(CAT_DOG_FILLER, k=8))
    queries = {"q1": "cat dog", "q2": "river fire", "q3": "nothing judged here"}
    qrels = {"q1": {"top": 1, "weak": 2, "m0": 0}, "q2": {"z0": 0}}
    return Collection(queries, corpus, qrels)
