"""Blends of the gated model's score terms, weighed on a dev set from one forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gated_fixtures import bi_encoder_dir, idf_table
from support import build_tokenizer

from crossrank.model.collate import pad_pairs
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.blend import (
    Blend,
    combine,
    evaluate_blends,
    grid,
    lexical_column,
    load_parts,
    save_parts,
    score_parts,
)
from crossrank_train.blend import main as blend_main
from crossrank_train.encoding import batch_feeds, to_tensors
from crossrank_train.evaluate import EvalSet
from crossrank_train.gated_bert import BM25Params, from_bi_encoder, pair_template_tokenizer
from crossrank_train.gated_bert import main as gated_bert_main


def terms(**columns: list[float]) -> dict[str, np.ndarray]:
    return {
        lexical_column(1.2, 0.75) if name == "lexical" else name: np.array(values, dtype=np.float32)
        for name, values in columns.items()
    }


def test_a_blend_is_the_weighted_sum_of_its_terms() -> None:
    parts = terms(cosine=[0.5, 0.1], maxsim=[0.2, 0.4], maxsim_idf=[0.3, 0.9], lexical=[1, 0])
    parts[lexical_column(0.9, 0.4)] = np.array([0.0, 2.0], dtype=np.float32)
    assert Blend(10, 2, False, 3).score(parts).tolist() == pytest.approx([8.4, 1.8])
    assert Blend(10, 2, True, 0).score(parts).tolist() == pytest.approx([5.6, 2.8])
    assert Blend(10, 0, False, 1, 0.9, 0.4).score(parts).tolist() == pytest.approx([5.0, 3.0])


def test_the_grid_has_one_blend_per_distinct_score() -> None:
    # MaxSim: none, 5 uniform, 5 IDF-weighted; times lexical 0 and 1.
    blends = grid(10, [0, 5], [0, 1])
    assert len(blends) == len(set(blends)) == 3 * 2
    assert Blend(10, 0, False, 1) in blends and Blend(10, 0, True, 1) not in blends
    assert Blend(10, 5, True, 1).name == "cos 10 + maxsim(idf) 5 + lexical 1"
    # BM25's parameters multiply the blends with a lexical term only.
    tuned = grid(10, [0, 5], [0, 1], [(1.2, 0.75), (0.9, 0.4)])
    assert len(tuned) == len(set(tuned)) == 3 * (1 + 2)
    assert (
        Blend(10, 5, True, 1, 0.9, 0.4).name == "cos 10 + maxsim(idf) 5 + lexical 1 (k1 0.9, b 0.4)"
    )


def test_blends_are_measured_against_the_cosine_alone() -> None:
    # Two queries; the cosine ranks their relevant passage last, exact matching first.
    eval_set = EvalSet(
        {"q1": "a", "q2": "b"},
        {},
        {"q1": {"p1": 1}, "q2": {"p3": 1}},
        {"q1": {"p1": 0, "p2": 0}, "q2": {"p3": 0, "p4": 0}},
        "first",
    )
    wrong = terms(cosine=[0.1, 0.5], maxsim=[0, 0], maxsim_idf=[0, 0], lexical=[1.0, 0.0])
    parts = {"q1": wrong, "q2": wrong}
    rows = {row["name"]: row for row in evaluate_blends(grid(1, [0], [0, 10]), parts, eval_set)}

    assert rows["cos 1"]["nDCG@10"] == pytest.approx(1 / np.log2(3))
    assert rows["cos 1 + lexical 10"]["nDCG@10"] == 1.0
    versus = rows["cos 1 + lexical 10"]["vs_cosine"]
    assert versus["wins"] == 2 and versus["delta"] == pytest.approx(1 - 1 / np.log2(3))


def test_terms_scored_for_the_grid_are_the_models_own(tmp_path: Path) -> None:
    model = from_bi_encoder(
        bi_encoder_dir(tmp_path), maxsim_scale=1.0, lexical_scale=1.0, idf=idf_table()
    ).eval()
    tokenizer_path = tmp_path / "tokenizer.json"
    pair_template_tokenizer(build_tokenizer()).save(str(tokenizer_path))
    tokenizer = PairTokenizer(tokenizer_path, 16, 128)
    passages = {"p1": "paris is the capital of france", "p2": "the cat", "p3": "blue sky"}
    query = "what is the capital of france"
    eval_set = EvalSet(
        {"q": query}, passages, {"q": {"p1": 1}}, {"q": dict.fromkeys(passages, 0.0)}, "x"
    )
    other = from_bi_encoder(
        bi_encoder_dir(tmp_path),
        lexical_scale=1.0,
        idf=idf_table(),
        bm25=BM25Params(k1=0.5, b=0.2),
    ).eval()

    parts = score_parts(model, tokenizer, eval_set, [(1.2, 0.75), (0.5, 0.2)], batch_size=2)
    found = parts["q"]

    # Scored in padded batches of 2, in length order: each row must be its own passage's terms,
    # and the lexical term with other BM25 parameters that of a model built with them.
    for row, text in enumerate(passages.values()):
        inputs = to_tensors(batch_feeds(pad_pairs(tokenizer.encode(query, [text]).pairs), True))
        with torch.no_grad():
            alone = model.score_parts(**inputs, every=True)
            tuned = other.score_parts(**inputs)
        for name in ("cosine", "maxsim", "maxsim_idf"):
            assert found[name][row] == pytest.approx(alone[name].item(), abs=1e-5)
        lexical = found[lexical_column(1.2, 0.75)][row]
        assert lexical == pytest.approx(alone["lexical"].item(), abs=1e-5)
        assert found[lexical_column(0.5, 0.2)][row] == pytest.approx(tuned["lexical"].item())

    # Saved terms come back as they were, for this eval set only.
    save_parts(tmp_path / "parts.npz", parts, eval_set)
    loaded = load_parts(tmp_path / "parts.npz", eval_set)
    assert loaded.keys() == parts.keys()
    assert all(np.array_equal(loaded["q"][n], found[n]) for n in found)
    fewer = EvalSet(eval_set.queries, passages, eval_set.qrels, {"q": {"p1": 0.0}}, "x")
    with pytest.raises(ValueError, match="other queries or candidates"):
        load_parts(tmp_path / "parts.npz", fewer)


def test_combine_ranks_blends_by_their_mean_over_dev_sets(tmp_path: Path) -> None:
    def write(name: str, figures: dict[str, float]) -> Path:
        path = tmp_path / f"{name}.json"
        blends = [{"name": blend, "nDCG@10": value} for blend, value in figures.items()]
        path.write_text(json.dumps({"blends": blends}))
        return path

    first = write("a", {"cos 10": 0.30, "cos 10 + lexical 2": 0.40, "only here": 0.9})
    second = write("b", {"cos 10": 0.30, "cos 10 + lexical 2": 0.36})

    table = combine([first, second])

    assert [name for name, _, _ in table] == ["cos 10 + lexical 2", "cos 10"]
    assert table[0][1] == pytest.approx(0.38) and table[0][2] == [0.40, 0.36]


def test_only_a_step_zero_model_is_described_by_its_terms(tmp_path: Path) -> None:
    model = from_bi_encoder(bi_encoder_dir(tmp_path), lexical_scale=1.0, idf=idf_table())
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.cross_gate[0] = 0.1
    tokenizer_path = tmp_path / "tokenizer.json"
    pair_template_tokenizer(build_tokenizer()).save(str(tokenizer_path))
    eval_set = EvalSet({"q": "paris"}, {"p": "paris"}, {"q": {"p": 1}}, {"q": {"p": 0.0}}, "x")

    with pytest.raises(ValueError, match="step-0"):
        score_parts(model, PairTokenizer(tokenizer_path, 16, 128), eval_set)


def test_the_blend_command_measures_a_grid_on_a_dev_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = bi_encoder_dir(tmp_path)
    build_tokenizer().save(str(source / "tokenizer.json"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "0", "text": "paris is the capital of france"}) + "\n")
    init = tmp_path / "init"
    argv = ["--bi-encoder", str(source), "--out", str(init), "--maxsim-scale", "1"]
    assert gated_bert_main([*argv, "--lexical-scale", "1", "--idf-corpus", str(corpus)]) == 0
    pairs = tmp_path / "pairs.jsonl"
    records = [
        {"id": "q1", "query": "capital of france", "positives": ["paris is the capital of france"]},
        {"id": "q2", "query": "a cat", "positives": ["the cat and a dog"]},
        {"id": "q3", "query": "blue sky", "positives": ["the blue sky over the river"]},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "blend.json"

    grid_flags = ["--maxsim", "0", "1", "--lexical", "0", "1", "--out", str(out)]
    saved = ["--parts", str(tmp_path / "parts.npz")]
    assert blend_main(["--model", str(init), "--pairs", str(pairs), *grid_flags, *saved]) == 0

    result = json.loads(out.read_text())
    assert result["queries"] == 3
    assert len(result["blends"]) == 6
    names = {row["name"] for row in result["blends"]}
    assert {"cos 10", "cos 10 + maxsim(idf) 1 + lexical 1"} <= names
    assert all(0.0 <= row["nDCG@10"] <= 1.0 for row in result["blends"])

    # A second grid over the saved terms runs no model; BM25's parameters it lacks are refused.
    assert blend_main(["--pairs", str(pairs), *grid_flags, *saved]) == 0
    assert json.loads(out.read_text()) == result
    with pytest.raises(SystemExit):
        blend_main(["--pairs", str(pairs), *grid_flags, *saved, "--k1", "0.5"])
    assert "has no lexical k1=0.5 b=0.75" in capsys.readouterr().err
