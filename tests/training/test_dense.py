"""Mining with a bi-encoder as the first stage: exact cosine search and the groups it gives."""

from __future__ import annotations

import json
from pathlib import Path

from toy_data import cat_dog_collection

from crossrank_train.cli import main
from crossrank_train.dense import DenseIndex
from crossrank_train.groups import read_groups
from crossrank_train.scoring import BiEncoderScorer


def test_search_returns_the_top_k_by_the_bi_encoders_cosine(tiny_checkpoint: Path) -> None:
    collection = cat_dog_collection()
    # Small batches: the index embeds in length-sorted batches, score() in the given order.
    encoder = BiEncoderScorer(tiny_checkpoint, "tiny", batch_size=4)
    query = "river fire cat"
    corpus = dict(collection.corpus, echo=query)
    index = DenseIndex(corpus, encoder)

    hits = index.search({"q": query}, 10)["q"]

    cosines = dict(zip(corpus, encoder.score(query, list(corpus.values())), strict=True))
    expected = sorted(cosines, key=cosines.__getitem__, reverse=True)[:10]
    ranked = sorted(hits, key=hits.__getitem__, reverse=True)
    assert ranked[0] == "echo"  # the query's own text: cosine 1
    assert abs(hits["echo"] - 1.0) < 1e-5
    assert set(ranked) == set(expected)
    for pid in ranked:
        assert abs(hits[pid] - cosines[pid]) < 1e-5


def test_mine_command_takes_negatives_from_the_bi_encoders_window(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    collection = cat_dog_collection()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps(
            {
                "id": "q1",
                "query": collection.queries["q1"],
                "positives": [collection.corpus["top"]],
                "positive_pids": ["top"],
            }
        )
        + "\n"
    )
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": p, "text": t}) + "\n" for p, t in collection.corpus.items())
    )
    out = tmp_path / "groups.jsonl"
    args = ["mine", "--pairs", str(pairs), "--corpus", str(corpus), "--out", str(out)]
    args += ["--retriever", "bi-encoder", "--bi-encoder", str(tiny_checkpoint)]
    args += ["--negatives", "4", "--random-negatives", "0", "--window", "2", "8"]

    assert main(args) == 0

    hits = DenseIndex(collection.corpus, BiEncoderScorer(tiny_checkpoint, "tiny")).search(
        {"q1": collection.queries["q1"]}, 8
    )["q1"]
    window = {
        collection.corpus[p] for p in sorted(hits, key=hits.__getitem__, reverse=True)[2:8]
    } - {collection.corpus["top"]}
    (group,) = read_groups(out, negatives=4)
    assert group.positive == collection.corpus["top"]
    assert len(set(group.negatives)) == 4
    assert set(group.negatives) <= window
