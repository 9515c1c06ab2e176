"""Turning (query, passages) into the token ids of one pair per passage, in one of two forms
behind one interface (:class:`PairEncoder`), so the batcher and engine never know which:

- :class:`PairTokenizer`, an encoder's pairs by its tokenizer's own pair template
  (``[CLS] query [SEP] passage [SEP]``, ``<s> query </s></s> passage </s>``, ...);
- :class:`PromptTokenizer`, an LLM reranker's pairs: the text of a prompt template around the
  query and the passage, tokenised as one text.

The training package uses these same classes, so a model is trained and exported on exactly the
inputs the service will give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Encoding, Tokenizer

from crossrank.model_dir import ModelDir, PromptTemplate


class QueryTooLongError(ValueError):
    """The query exceeds its token budget and the caller asked not to truncate."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"the query has {tokens} tokens, over the budget of {budget}")
        self.tokens = tokens
        self.budget = budget


class PassageTooLongError(ValueError):
    """A pair exceeds the model's max length and the caller asked not to truncate."""

    def __init__(self, index: int, tokens: int, max_length: int) -> None:
        super().__init__(f"pair {index} has {tokens} tokens, over the max length of {max_length}")
        self.index = index
        self.tokens = tokens
        self.max_length = max_length


class InstructionError(ValueError):
    """An instruction was given to a model whose input has no place for one."""


class ChunkingError(ValueError):
    """Chunking was asked of a model whose pairs cannot be cut into windows."""


@dataclass(frozen=True, slots=True)
class Chunking:
    """Long passages as overlapping windows of passage tokens, each scored as its own pair."""

    stride: int  # passage tokens shared by consecutive windows
    max_chunks: int  # windows kept per passage, from its start


@dataclass(frozen=True, slots=True)
class EncodedPair:
    input_ids: np.ndarray  # int64, shape [length]
    token_type_ids: np.ndarray  # int64, shape [length]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True, slots=True)
class EncodedRequest:
    pairs: list[EncodedPair]
    truncated: int  # passages (or the query) cut: text left out of every pair
    # Chunked only: the passage of each pair (a passage's windows are consecutive, in order) and
    # each window's passage characters [start, end).
    owners: list[int] | None = None
    spans: list[tuple[int, int]] | None = None

    @property
    def tokens(self) -> int:
        return sum(p.length for p in self.pairs)


class PairEncoder(Protocol):
    """What the service asks of a pair tokeniser, whatever its form."""

    max_query_tokens: int
    max_length: int

    @property
    def min_window(self) -> int | None:
        """Passage tokens a window holds beside the longest query; None: no chunking."""
        ...

    def encode(
        self,
        query: str,
        passages: list[str],
        truncate: bool = True,
        instruction: str | None = None,
        max_passage_tokens: int | None = None,
        chunking: Chunking | None = None,
    ) -> EncodedRequest:
        """One pair per passage (per window of a passage with ``chunking``), each passage first
        cut to ``max_passage_tokens``. Blocking (Rust code that releases the GIL): call it off
        the event loop. Raises QueryTooLongError / PassageTooLongError when ``truncate`` is
        false and a cut is needed, InstructionError for an instruction the model has no place
        for, ChunkingError for chunking a model cannot do."""
        ...


def _plain_tokenizer(tokenizer_file: str | Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _cut_query(tokenizer: Tokenizer, query: str, budget: int, truncate: bool) -> tuple[str, bool]:
    """The query, cut to ``budget`` tokens; and whether it was cut."""
    encoding = tokenizer.encode(query, add_special_tokens=False)
    if len(encoding.ids) <= budget:
        return query, False
    if not truncate:
        raise QueryTooLongError(len(encoding.ids), budget)
    # Cut the text at the end of the last token that fits, so every pair is built from the same
    # query prefix.
    end = encoding.offsets[budget - 1][1]
    return query[:end], True


def _cut_passages(
    tokenizer: Tokenizer, passages: list[str], budget: int | None
) -> tuple[list[str], list[bool]]:
    """Each passage cut at the end of its ``budget``-th token (Cohere's max_tokens_per_doc)."""
    if budget is None:
        return passages, [False] * len(passages)
    cut, flags = [], []
    for passage, encoding in zip(
        passages, tokenizer.encode_batch(passages, add_special_tokens=False), strict=True
    ):
        if len(encoding.ids) > budget:
            cut.append(passage[: encoding.offsets[budget - 1][1]])
            flags.append(True)
        else:
            cut.append(passage)
            flags.append(False)
    return cut, flags


def _passage_span(encoding: Encoding) -> tuple[int, int]:
    """The characters of the passage (the pair's second sequence) a window holds."""
    offsets = [o for o, seq in zip(encoding.offsets, encoding.sequence_ids, strict=True) if seq]
    return (offsets[0][0], offsets[-1][1]) if offsets else (0, 0)


def _pair(encoding: Encoding) -> EncodedPair:
    return EncodedPair(
        np.asarray(encoding.ids, dtype=np.int64), np.asarray(encoding.type_ids, dtype=np.int64)
    )


class PairTokenizer:
    """An encoder's pairs by its tokenizer's pair template. Query truncated to
    ``max_query_tokens``; pair truncated longest-first to ``max_length``."""

    def __init__(self, tokenizer_file: str | Path, max_query_tokens: int, max_length: int) -> None:
        self.max_query_tokens = max_query_tokens
        self.max_length = max_length
        self._query_tokenizer = _plain_tokenizer(tokenizer_file)
        self._pair_tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._pair_tokenizer.no_padding()
        self._pair_tokenizer.enable_truncation(max_length, strategy="longest_first")
        # Windows: the tokenizer's own overflow, cutting only the passage, on token boundaries.
        self._window_tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._window_tokenizer.no_padding()
        self._window_stride: int | None = None

    @property
    def min_window(self) -> int | None:
        processor = self._pair_tokenizer.post_processor
        specials = processor.num_special_tokens_to_add(True) if processor else 0
        return self.max_length - self.max_query_tokens - specials

    def encode(
        self,
        query: str,
        passages: list[str],
        truncate: bool = True,
        instruction: str | None = None,
        max_passage_tokens: int | None = None,
        chunking: Chunking | None = None,
    ) -> EncodedRequest:
        """Blocking (runs Rust code that releases the GIL): call it off the event loop."""
        if instruction is not None:
            raise InstructionError("this model's pairs take no instruction")
        query, query_cut = _cut_query(self._query_tokenizer, query, self.max_query_tokens, truncate)
        passages, passage_cut = _cut_passages(self._query_tokenizer, passages, max_passage_tokens)
        if chunking is not None:
            return self._windows(query, query_cut, passages, passage_cut, chunking)
        # The query is tokenised again inside every pair. Assembling the pairs from one query
        # encoding instead (encode_batch over the passages alone, then Tokenizer.post_process per
        # pair for truncation and the template) was measured no faster: the per-pair Python call
        # costs what the repeated query does, and this batch call runs in parallel in Rust.
        encodings = self._pair_tokenizer.encode_batch([(query, p) for p in passages])
        pairs: list[EncodedPair] = []
        truncated = 0
        for index, enc in enumerate(encodings):
            if enc.overflowing:
                if not truncate:
                    full = self._full_length(query, passages[index])
                    raise PassageTooLongError(index, full, self.max_length)
                truncated += 1
            elif query_cut or passage_cut[index]:
                truncated += 1
            pairs.append(_pair(enc))
        return EncodedRequest(pairs, truncated)

    def _windows(
        self,
        query: str,
        query_cut: bool,
        passages: list[str],
        passage_cut: list[bool],
        chunking: Chunking,
    ) -> EncodedRequest:
        window = self.min_window or 0
        if chunking.stride >= window:
            # The tokenizer panics on it: a stride must leave each window new tokens.
            raise ChunkingError(
                f"a stride of {chunking.stride} tokens leaves no new tokens in a window of "
                f"{window} passage tokens; use less than {window}"
            )
        if chunking.stride != self._window_stride:
            # Tokenisation runs on one thread (the reranker's pool): setting it here is safe.
            self._window_tokenizer.enable_truncation(
                self.max_length, stride=chunking.stride, strategy="only_second"
            )
            self._window_stride = chunking.stride
        pairs: list[EncodedPair] = []
        owners: list[int] = []
        spans: list[tuple[int, int]] = []
        truncated = 0
        encodings = self._window_tokenizer.encode_batch([(query, p) for p in passages])
        for index, first in enumerate(encodings):
            windows = [first, *first.overflowing]
            if len(windows) > chunking.max_chunks or query_cut or passage_cut[index]:
                truncated += 1
            for window in windows[: chunking.max_chunks]:
                pairs.append(_pair(window))
                owners.append(index)
                spans.append(_passage_span(window))
        return EncodedRequest(pairs, truncated, owners, spans)

    def _full_length(self, query: str, passage: str) -> int:
        return len(self._query_tokenizer.encode(query, passage).ids)


class PromptTokenizer:
    """An LLM reranker's pairs: ``template.head(query) + passage + template.suffix`` tokenised as
    one text with the tokenizer's single-sequence special tokens (a BOS where it adds one), as
    the models' own recipes tokenise it, so the tokens at the joins are the ones the model knows.
    The query is cut to ``max_query_tokens`` first; then only the passage is cut, at a token's
    end, until the pair fits ``max_length``: never the template, never the query's budget.
    """

    def __init__(
        self,
        tokenizer_file: str | Path,
        template: PromptTemplate,
        max_query_tokens: int,
        max_length: int,
    ) -> None:
        self.template = template
        self.max_query_tokens = max_query_tokens
        self.max_length = max_length
        self._tokenizer = _plain_tokenizer(tokenizer_file)
        fixed = len(self._tokenizer.encode(template.head("") + template.suffix).ids)
        # A pair must keep room for a passage after the template and a full query.
        if fixed + max_query_tokens >= max_length:
            raise ValueError(
                f"the prompt template takes {fixed} tokens; with {max_query_tokens} query tokens "
                f"nothing of a passage fits in max_length {max_length}"
            )

    @property
    def min_window(self) -> int | None:
        return None

    def encode(
        self,
        query: str,
        passages: list[str],
        truncate: bool = True,
        instruction: str | None = None,
        max_passage_tokens: int | None = None,
        chunking: Chunking | None = None,
    ) -> EncodedRequest:
        """Blocking (runs Rust code that releases the GIL): call it off the event loop."""
        if instruction is not None and not self.template.takes_instruction:
            raise InstructionError("this model's prompt template has no place for an instruction")
        if chunking is not None:
            raise ChunkingError(
                "this model's pairs are one prompt text: long_passages chunk is not supported"
            )
        query, query_cut = _cut_query(self._tokenizer, query, self.max_query_tokens, truncate)
        passages, passage_cut = _cut_passages(self._tokenizer, passages, max_passage_tokens)
        head = self.template.head(query, instruction)
        encodings = self._tokenizer.encode_batch([self._text(head, p) for p in passages])
        pairs: list[EncodedPair] = []
        truncated = 0
        for index, enc in enumerate(encodings):
            if len(enc.ids) > self.max_length:
                if not truncate:
                    raise PassageTooLongError(index, len(enc.ids), self.max_length)
                enc = self._cut_passage(index, head, passages[index], enc)
                truncated += 1
            elif query_cut or passage_cut[index]:
                truncated += 1
            pairs.append(_pair(enc))
        return EncodedRequest(pairs, truncated)

    def _text(self, head: str, passage: str) -> str:
        return head + passage + self.template.suffix

    def _cut_passage(self, index: int, head: str, passage: str, encoding: Encoding) -> Encoding:
        """Re-encode with the passage cut at the end of its last token that fits. A cut text
        can tokenise a little differently at the cut, so the count is checked again."""
        start, stop = len(head), len(head) + len(passage)
        # The passage's tokens, by where they end in it (a token across the join counts).
        ends = [end - start for begin, end in encoding.offsets if end > start and begin < stop]
        keep = len(ends) - (len(encoding.ids) - self.max_length)
        while keep > 0:
            encoding = self._tokenizer.encode(self._text(head, passage[: ends[keep - 1]]))
            if len(encoding.ids) <= self.max_length:
                return encoding
            keep -= len(encoding.ids) - self.max_length
        # Only an instruction much longer than the default leaves no room for any passage.
        raise PassageTooLongError(index, len(encoding.ids), self.max_length)


def load_pair_encoder(model: ModelDir) -> PairEncoder:
    """The model directory's pair tokeniser: its prompt template's, else its tokenizer's pairs."""
    meta = model.metadata
    if meta.prompt is None:
        return PairTokenizer(model.tokenizer_path, meta.max_query_tokens, meta.max_length)
    return PromptTokenizer(
        model.tokenizer_path, meta.prompt, meta.max_query_tokens, meta.max_length
    )
