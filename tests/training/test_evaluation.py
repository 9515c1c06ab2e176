from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t
from toy_data import MARKER

from crossrank_train.cli import main
from crossrank_train.evaluate import (
    EvalSet,
    compare,
    evaluate,
    format_p,
    load_eval_set,
    measure,
    per_query_ndcg,
    rerank,
)
from crossrank_train.scoring import BiEncoderScorer


class MarkerCounter:
    """An oracle: a passage's score is how often it says the marker."""

    name = "oracle"

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return np.array([p.split().count(MARKER) for p in passages], dtype=np.float32)


def test_measures_match_hand_computed_values() -> None:
    qrels = {"q1": {"d1": 1, "d3": 0}, "q2": {"d5": 2}}
    run = {"q1": {"d2": 3.0, "d1": 2.0, "d3": 1.0}, "q2": {"d5": 9.0, "d6": 1.0}}

    figures = measure(qrels, run)

    # q1: its one relevant passage at rank 2; q2: at rank 1.
    assert figures["RR@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert figures["nDCG@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert figures["R@100"] == pytest.approx(1.0)


def _eval_set() -> EvalSet:
    corpus = {f"d{n}": " ".join(["cat"] + [MARKER] * n) for n in range(5)}
    # The first stage ranks the passages worst first.
    candidates = {"q1": {f"d{n}": float(10 - n) for n in range(5)}}
    return EvalSet({"q1": "cat"}, corpus, {"q1": {"d4": 2, "d3": 1}}, candidates, "reversed")


def test_reranking_is_measured_next_to_the_first_stage() -> None:
    eval_set = _eval_set()

    assert rerank(MarkerCounter(), eval_set)["q1"] == {f"d{n}": float(n) for n in range(5)}
    evaluation = evaluate([MarkerCounter()], eval_set)
    first_stage, oracle = evaluation.rows

    assert first_stage["name"] == "reversed"
    assert first_stage["RR@10"] == pytest.approx(1 / 4)
    assert oracle["name"] == "oracle"
    assert oracle["nDCG@10"] == pytest.approx(1.0)
    [comparison] = evaluation.comparisons
    assert (comparison.system, comparison.baseline) == ("oracle", "reversed")
    assert comparison.delta == pytest.approx(1.0 - first_stage["nDCG@10"])
    assert (comparison.wins, comparison.losses) == (1, 0)


def test_systems_are_compared_query_by_query() -> None:
    qrels = {q: {"rel": 1} for q in ("q1", "q2", "q3", "q4")}
    first = {q: {"rel": 2.0, "other": 1.0} for q in qrels}
    # Better on q1 and q2 (relevant passage 2nd -> 1st), the same on q3 and q4.
    second = {q: {"rel": 1.0 if q in ("q1", "q2") else 2.0, "other": 1.5} for q in qrels}

    c = compare(
        "first", per_query_ndcg(qrels, first), "second", per_query_ndcg(qrels, second), qrels
    )

    gain = 1 - 1 / math.log2(3)
    assert c.delta == pytest.approx(gain / 2)
    assert (c.wins, c.losses) == (2, 0)
    # Paired: differences (g, g, 0, 0) have mean g/2 and sd g/sqrt(3), so t = sqrt(3) on 3
    # degrees of freedom, whatever g (an unpaired test would see the spread of the scores).
    assert c.p_value == pytest.approx(2 * student_t.sf(math.sqrt(3), 3))
    same = per_query_ndcg(qrels, first)
    assert compare("first", same, "same", same, qrels).p_value == 1.0
    # One query has no spread to test against: no p-value, rather than a p of 1.
    one = {"q1": qrels["q1"]}
    alone = compare("first", per_query_ndcg(one, first), "second", per_query_ndcg(one, second), one)
    assert alone.p_value is None and alone.delta == pytest.approx(gain)
    assert format_p(alone.p_value) == "n/a (one query)" and format_p(0.01234) == "0.0123"


def test_eval_set_keeps_judged_queries_and_cuts_the_run(tmp_path: Path) -> None:
    (tmp_path / "queries.tsv").write_text("1\tcats\n2\tdogs\n3\tfish\n4\tbirds\n")
    (tmp_path / "qrels.txt").write_text("1 0 a 1\n2 0 b 0\n3 0 c 2\n4 0 d 1\n")
    passages = {"a": "cats purr", "b": "dogs bark", "c": "fish swim", "d": "birds fly"}
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in passages.items())
    )
    (tmp_path / "run").write_text(
        "1 Q0 a 1 3.0 t\n1 Q0 b 2 2.0 t\n1 Q0 gone 3 1.5 t\n1 Q0 c 4 1.0 t\n3 Q0 c 1 5.0 t\n"
    )
    paths = [tmp_path / n for n in ("queries.tsv", "qrels.txt", "corpus.jsonl")]

    files = dict(zip(("queries", "qrels", "corpus"), paths, strict=True))
    from_run = load_eval_set(**files, run=tmp_path / "run", depth=3, max_queries=2)
    from_bm25 = load_eval_set(**files)

    # Query 2 has no relevant judgement; max_queries=2 stops before query 4.
    assert list(from_run.queries) == ["1", "3"]
    assert set(from_run.qrels) == {"1", "3"}
    # Depth 3 keeps a, b, "gone"; "gone" has no text and is dropped.
    assert from_run.candidates == {"1": {"a": 3.0, "b": 2.0}, "3": {"c": 5.0}}
    assert list(from_bm25.queries) == ["1", "3", "4"]
    assert {q: list(c) for q, c in from_bm25.candidates.items()} == {
        "1": ["a"],
        "3": ["c"],
        "4": ["d"],
    }


def test_bi_encoder_scores_cosine_of_mean_pooled_embeddings(tiny_checkpoint: Path) -> None:
    scorer = BiEncoderScorer(tiny_checkpoint, "tiny")

    scores = scorer.score("paris is the capital", ["paris is the capital", "dog fire water"])

    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scores[1] < scores[0]


def test_two_systems_of_one_name_keep_their_own_rows() -> None:
    evaluation = evaluate([MarkerCounter(), MarkerCounter()], _eval_set())

    assert [row["name"] for row in evaluation.rows] == ["reversed", "oracle", "oracle #2"]
    assert len(evaluation.comparisons) == 3


def test_grade_map_turns_a_best_is_one_scale_into_gains(tmp_path: Path) -> None:
    # Cranfield-style files: SMART documents and queries, qrels graded 1 (a complete answer)
    # to 4 (of minimum interest); the run ranks the complete answer first.
    docs = tmp_path / "docs"
    docs.write_text(".I 1\n.W\nthe complete answer\n.I 2\n.W\nof minimum interest\n")
    queries = tmp_path / "queries"
    queries.write_text(".I 007\n.W\nwhat answers it\n")
    qrels = tmp_path / "qrels"
    qrels.write_text("1 1 1\n1 2 4\n")
    run = tmp_path / "run"
    run.write_text("1 Q0 1 1 2.0 first\n1 Q0 2 2 1.0 first\n")

    files = {"queries": queries, "qrels": qrels, "corpus": docs, "run": run}
    as_published = load_eval_set(**files)
    as_gains = load_eval_set(**files, grade_map={1: 4, 2: 3, 3: 2, 4: 1})

    assert as_gains.qrels == {"1": {"1": 4, "2": 1}}
    assert measure(as_gains.qrels, as_gains.candidates)["nDCG@10"] == pytest.approx(1.0)
    assert measure(as_published.qrels, as_published.candidates)["nDCG@10"] < 0.8


def test_eval_command_refuses_a_malformed_grade_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("queries", "qrels", "corpus"):
        (tmp_path / name).write_text("")
    files = [f"--{name}={tmp_path / name}" for name in ("queries", "qrels", "corpus")]

    assert main(["eval", *files, "--grade-map", "1=4,best=0"]) == 2
    assert "--grade-map takes OLD=NEW integer pairs, got 'best=0'" in capsys.readouterr().err
