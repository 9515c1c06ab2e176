from __future__ import annotations

import json
from pathlib import Path

import pytest
from toy_data import cat_dog_collection

from crossrank_train.bm25 import Bm25Index
from crossrank_train.cli import main
from crossrank_train.groups import read_groups, write_groups
from crossrank_train.mining import MiningConfig, mine_groups
from crossrank_train.readers import Collection
from crossrank_train.scoring import load_scorer


def _window_pool(collection: Collection, index: Bm25Index, window: tuple[int, int]) -> set[str]:
    """The texts of q1's BM25 hits [start:end], its positives and their copies left out."""
    hits = index.search({"q1": collection.queries["q1"]}, 100)["q1"]
    ranked = sorted(hits, key=hits.__getitem__, reverse=True)[window[0] : window[1]]
    texts = {collection.corpus[pid] for pid in ranked}
    return texts - {collection.corpus["top"], collection.corpus["weak"]}


def test_hard_negatives_come_from_the_rank_window_minus_positives() -> None:
    collection = cat_dog_collection()
    index = Bm25Index(collection.corpus)
    window = (5, 40)
    config = MiningConfig(negatives=6, random_negatives=0, window=window, seed=3)

    groups = list(mine_groups(collection, config, index))

    # One group per positive of q1; q2 and q3 have none.
    assert [g.positive for g in groups] == [collection.corpus["top"], collection.corpus["weak"]]
    pool = _window_pool(collection, index, window)
    above_window = _window_pool(collection, index, (0, window[0])) - pool
    assert above_window  # the window's start cuts something off
    for group in groups:
        assert len(set(group.negatives)) == 6
        assert set(group.negatives) <= pool


def test_random_negatives_join_the_hard_ones_and_fill_a_short_pool() -> None:
    collection = cat_dog_collection()
    index = Bm25Index(collection.corpus)
    positives = {collection.corpus["top"], collection.corpus["weak"]}
    for window, most_outside in (((1, 40), 2), ((1, 3), 6)):
        config = MiningConfig(negatives=6, random_negatives=2, window=window, seed=3)
        pool = _window_pool(collection, index, window)
        for group in mine_groups(collection, config, index):
            assert len(set(group.negatives)) == 6
            assert not set(group.negatives) & positives
            assert len(set(group.negatives) - pool) <= most_outside


def test_mining_is_deterministic_per_seed() -> None:
    collection = cat_dog_collection()
    index = Bm25Index(collection.corpus)

    def mine(seed: int) -> list:
        return list(mine_groups(collection, MiningConfig(window=(1, 40), seed=seed), index))

    assert mine(1) == mine(1)
    assert mine(1) != mine(2)


def test_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        MiningConfig(window=(50, 10))


def test_mine_command_writes_groups_with_teacher_scores(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    collection = cat_dog_collection()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": p, "text": t}) + "\n" for p, t in collection.corpus.items())
    )
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in collection.queries.items())
    )
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(
            f"{q}\t{p}\t{g}\n" for q, judged in collection.qrels.items() for p, g in judged.items()
        )
    )
    out = tmp_path / "groups.jsonl"

    code = main(
        [
            "mine",
            "--corpus",
            str(corpus),
            "--queries",
            str(queries),
            "--qrels",
            str(qrels),
            "--out",
            str(out),
            "--negatives",
            "3",
            "--window",
            "1",
            "40",
            "--teacher",
            str(tiny_checkpoint),
        ]
    )

    assert code == 0
    groups = read_groups(out, negatives=3)
    assert len(groups) == 2
    assert all(g.teacher_scores is not None and len(g.teacher_scores) == 4 for g in groups)
    assert len({s for g in groups for s in g.teacher_scores}) > 1


def test_teach_scores_mined_groups_with_the_teacher(tiny_checkpoint: Path, tmp_path: Path) -> None:
    mined = tmp_path / "groups.jsonl"
    write_groups(
        mined, mine_groups(cat_dog_collection(), MiningConfig(negatives=3, window=(1, 40)))
    )
    out = tmp_path / "taught.jsonl"

    code = main(
        [
            "teach",
            "--groups",
            str(mined),
            "--teacher",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--max-groups",
            "1",
        ]
    )

    assert code == 0
    (taught,) = read_groups(out)
    first = read_groups(mined)[0]
    assert (taught.query, taught.passages) == (first.query, first.passages)
    expected = load_scorer(tiny_checkpoint, variant="fp32").score(first.query, first.passages)
    assert taught.teacher_scores == pytest.approx(expected.tolist(), rel=1e-6)
