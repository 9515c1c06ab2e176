"""Pair tokenisation: template, budgets, truncation."""

from __future__ import annotations

import pytest

from crossrank.model.model_dir import ModelDir
from crossrank.model.tokenization import PairTokenizer, PassageTooLongError, QueryTooLongError


@pytest.fixture
def tokenizer(model_dir: ModelDir) -> PairTokenizer:
    return PairTokenizer(model_dir.tokenizer_path, max_query_tokens=8, max_length=32)


def test_pair_template_and_segments(tokenizer: PairTokenizer) -> None:
    pair = tokenizer.encode("blue sky", ["the cat"]).pairs[0]
    cls, sep = 2, 3  # ids of [CLS] and [SEP] in the tiny vocabulary
    ids = pair.input_ids.tolist()
    assert ids[0] == cls and ids.count(sep) == 2 and ids[-1] == sep
    first_sep = ids.index(sep)
    assert pair.token_type_ids[: first_sep + 1].tolist() == [0] * (first_sep + 1)
    assert set(pair.token_type_ids[first_sep + 1 :].tolist()) == {1}


def test_query_cut_to_its_budget_and_passage_to_max_length(tokenizer: PairTokenizer) -> None:
    encoded = tokenizer.encode("sky " * 20, ["water " * 100, "a cat"])
    long, short = encoded.pairs
    ids = long.input_ids.tolist()
    assert long.length == 32
    assert ids.index(3) == 1 + 8  # [CLS] + 8 query tokens, then [SEP]
    assert short.length == 1 + 8 + 1 + 2 + 1
    assert encoded.truncated == 2  # both pairs lost query tokens, one lost passage tokens too
    assert encoded.tokens == 32 + short.length


def test_no_truncation_reports_the_offending_passage(tokenizer: PairTokenizer) -> None:
    with pytest.raises(PassageTooLongError) as err:
        tokenizer.encode("sky", ["a cat", "water " * 100], truncate=False)
    assert err.value.index == 1
    with pytest.raises(QueryTooLongError):
        tokenizer.encode("sky " * 20, ["a cat"], truncate=False)
    assert tokenizer.encode("sky", ["a cat"], truncate=False).truncated == 0
