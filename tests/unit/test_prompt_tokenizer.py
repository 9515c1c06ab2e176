"""The prompt-template form of pair tokenisation (LLM rerankers): the template applied exactly,
only the passage cut, the instruction's slot."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from support import QWEN3_RERANKER_PROMPT, qwen
from tokenizers import Tokenizer

from crossrank.model.model_dir import PromptTemplate
from crossrank.model.tokenization import (
    PassageTooLongError,
    PromptTokenizer,
    QueryTooLongError,
)

TEMPLATE = PromptTemplate.model_validate(QWEN3_RERANKER_PROMPT)
QUERY = "what is the capital of france"
PASSAGE = "paris is the capital city of france and a city on a river"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen") / "tokenizer.json"
    qwen().save(str(path))
    return path


@pytest.fixture(scope="module")
def raw(tokenizer_file: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_file))


def full_text(query: str, passage: str, instruction: str | None = None) -> str:
    prefix = QWEN3_RERANKER_PROMPT["prefix"].replace(
        "{instruction}", instruction or QWEN3_RERANKER_PROMPT["instruction"]
    )
    return prefix + query + QWEN3_RERANKER_PROMPT["separator"] + passage + TEMPLATE.suffix


def test_the_template_is_applied_exactly(tokenizer_file: Path, raw: Tokenizer) -> None:
    encoder = PromptTokenizer(tokenizer_file, TEMPLATE, max_query_tokens=16, max_length=256)
    encoded = encoder.encode(QUERY, [PASSAGE, "a cat"])
    for pair, passage in zip(encoded.pairs, [PASSAGE, "a cat"], strict=True):
        # One text, tokenised as the model's own recipe tokenises it.
        assert pair.input_ids.tolist() == raw.encode(full_text(QUERY, passage)).ids
        assert raw.decode(pair.input_ids.tolist(), skip_special_tokens=False) == full_text(
            QUERY, passage
        )
        assert set(pair.token_type_ids.tolist()) == {0}
    ids = encoded.pairs[0].input_ids.tolist()
    assert ids[0] == raw.token_to_id("<|im_start|>")
    suffix = raw.encode(TEMPLATE.suffix).ids
    assert ids[-len(suffix) :] == suffix
    assert encoded.truncated == 0


def test_only_the_passage_is_cut(tokenizer_file: Path, raw: Tokenizer) -> None:
    max_length = 240
    encoder = PromptTokenizer(tokenizer_file, TEMPLATE, max_query_tokens=4, max_length=max_length)
    long_passage = " ".join([PASSAGE] * 40)
    encoded = encoder.encode(QUERY, [long_passage, "a cat"])
    long, short = encoded.pairs
    assert long.length == max_length
    text = raw.decode(long.input_ids.tolist(), skip_special_tokens=False)
    # The query at its budget (4 tokens), then the template, whole; of the passage, a prefix.
    query = raw.decode(raw.encode(QUERY, add_special_tokens=False).ids[:4])
    head = TEMPLATE.head(query)
    assert text.startswith(head) and text.endswith(TEMPLATE.suffix)
    kept = text[len(head) : -len(TEMPLATE.suffix)]
    assert 0 < len(kept) < len(long_passage) and long_passage.startswith(kept)
    assert short.input_ids.tolist() == raw.encode(full_text(query, "a cat")).ids
    assert encoded.truncated == 2  # both lost query tokens, one lost passage tokens too

    with pytest.raises(PassageTooLongError) as err:
        encoder.encode("capital", ["a cat", long_passage], truncate=False)
    assert err.value.index == 1
    with pytest.raises(QueryTooLongError):
        encoder.encode(QUERY, ["a cat"], truncate=False)


def test_a_request_may_replace_the_instruction(tokenizer_file: Path, raw: Tokenizer) -> None:
    encoder = PromptTokenizer(tokenizer_file, TEMPLATE, max_query_tokens=16, max_length=256)
    own = "Find the city named by the query"
    pair = encoder.encode(QUERY, [PASSAGE], instruction=own).pairs[0]
    assert pair.input_ids.tolist() == raw.encode(full_text(QUERY, PASSAGE, own)).ids

    bare = PromptTemplate(prefix="Query: ", separator="\nDocument: ", suffix="\nRelevant:")
    with pytest.raises(ValueError, match="no place for an instruction"):
        PromptTokenizer(tokenizer_file, bare, 16, 256).encode(QUERY, [PASSAGE], instruction=own)
    assert not PromptTokenizer(tokenizer_file, bare, 16, 256).takes_instruction


def test_template_refusals(tokenizer_file: Path) -> None:
    with pytest.raises(ValidationError, match="no default instruction"):
        PromptTemplate(prefix="{instruction} Query: ", separator=" Document: ")
    with pytest.raises(ValidationError, match="slot in the prefix"):
        PromptTemplate(prefix="Query: ", separator=" Document: ", instruction="Judge")
    with pytest.raises(ValidationError, match="prefix only"):
        PromptTemplate(separator=" Document: ", suffix="{instruction}", instruction="Judge")
    # A window the template and the query's budget fill leaves no room for a passage.
    with pytest.raises(ValueError, match="nothing of a passage fits"):
        PromptTokenizer(tokenizer_file, TEMPLATE, max_query_tokens=64, max_length=200)
