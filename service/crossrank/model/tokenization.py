"""Turning (query, passages) into the token ids of one pair per passage, in one of two forms
behind one interface (:class:`PairEncoder`), so the queue and engine never know which:

- :class:`PairTokenizer`, an encoder's pairs by its tokenizer's own pair template
  (``[CLS] query [SEP] passage [SEP]``, ``<s> query </s></s> passage </s>``, ...); its
  :class:`WindowTokenizer` cuts long passages into overlapping windows instead of truncating;
- :class:`PromptTokenizer`, an LLM reranker's pairs: the text of a prompt template around the
  query and the passage, tokenised as one text, with an instruction where the template has a
  slot for one.

The training package uses these same classes, so a model is trained and exported on exactly the
inputs the service will give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Encoding, Tokenizer

from crossrank.model.model_dir import ModelDir, PromptTemplate


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

    def encode(
        self,
        query: str,
        passages: list[str],
        truncate: bool = True,
        max_passage_tokens: int | None = None,
    ) -> EncodedRequest:
        """One pair per passage, each passage first cut to ``max_passage_tokens``. Blocking
        (Rust code that releases the GIL): call it off the event loop. Raises QueryTooLongError
        / PassageTooLongError when ``truncate`` is false and a cut is needed."""
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
        self._file = str(tokenizer_file)
        self._query_tokenizer = _plain_tokenizer(tokenizer_file)
        self._pair_tokenizer = Tokenizer.from_file(self._file)
        self._pair_tokenizer.no_padding()
        self._pair_tokenizer.enable_truncation(max_length, strategy="longest_first")

    @property
    def min_window(self) -> int:
        """Passage tokens a pair holds beside the longest query."""
        processor = self._pair_tokenizer.post_processor
        specials = processor.num_special_tokens_to_add(True) if processor else 0
        return self.max_length - self.max_query_tokens - specials

    def windows(self, stride: int) -> WindowTokenizer:
        """Long passages cut into windows sharing ``stride`` passage tokens."""
        return WindowTokenizer(self, stride)

    def encode(
        self,
        query: str,
        passages: list[str],
        truncate: bool = True,
        max_passage_tokens: int | None = None,
    ) -> EncodedRequest:
        """Blocking (runs Rust code that releases the GIL): call it off the event loop."""
        query, query_cut = _cut_query(self._query_tokenizer, query, self.max_query_tokens, truncate)
        passages, passage_cut = _cut_passages(self._query_tokenizer, passages, max_passage_tokens)
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
                    full = len(self._query_tokenizer.encode(query, passages[index]).ids)
                    raise PassageTooLongError(index, full, self.max_length)
                truncated += 1
            elif query_cut or passage_cut[index]:
                truncated += 1
            pairs.append(_pair(enc))
        return EncodedRequest(pairs, truncated)


class WindowTokenizer:
    """A pair model's long passages as overlapping windows, each scored as its own pair: the
    tokenizer's own overflow, cutting only the passage, on token boundaries."""

    def __init__(self, pairs: PairTokenizer, stride: int) -> None:
        window = pairs.min_window
        if not 0 <= stride < window:
            # The tokenizer panics on it: a stride must leave each window new tokens.
            raise ValueError(
                f"a stride of {stride} tokens leaves no new tokens in a window of {window} "
                f"passage tokens; use less than {window}"
            )
        self.stride = stride
        self._pairs = pairs
        self._tokenizer = Tokenizer.from_file(pairs._file)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(pairs.max_length, stride=stride, strategy="only_second")

    def encode(
        self,
        query: str,
        passages: list[str],
        max_chunks: int,
        truncate: bool = True,
        max_passage_tokens: int | None = None,
    ) -> EncodedRequest:
        """At most ``max_chunks`` windows a passage, from its start. Blocking, as
        :meth:`PairTokenizer.encode`."""
        p = self._pairs
        query, query_cut = _cut_query(p._query_tokenizer, query, p.max_query_tokens, truncate)
        passages, passage_cut = _cut_passages(p._query_tokenizer, passages, max_passage_tokens)
        pairs: list[EncodedPair] = []
        owners: list[int] = []
        spans: list[tuple[int, int]] = []
        truncated = 0
        encodings = self._tokenizer.encode_batch([(query, text) for text in passages])
        for index, first in enumerate(encodings):
            windows = [first, *first.overflowing]
            if len(windows) > max_chunks or query_cut or passage_cut[index]:
                truncated += 1
            for window in windows[:max_chunks]:
                pairs.append(_pair(window))
                owners.append(index)
                spans.append(_passage_span(window))
        return EncodedRequest(pairs, truncated, owners, spans)


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
    def takes_instruction(self) -> bool:
        return self.template.takes_instruction

    def encode(
        self,
        query: str,
        passages: list[str],
        truncate: bool = True,
        max_passage_tokens: int | None = None,
        instruction: str | None = None,
    ) -> EncodedRequest:
        """Blocking (runs Rust code that releases the GIL): call it off the event loop.
        ``instruction`` replaces the template's own (which must have a slot for one)."""
        if instruction is not None and not self.template.takes_instruction:
            raise ValueError("this model's prompt template has no place for an instruction")
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


def pair_encoder(
    tokenizer_file: str | Path,
    prompt: PromptTemplate | None,
    max_query_tokens: int,
    max_length: int,
) -> PairTokenizer | PromptTokenizer:
    """The pair tokeniser of a model: its prompt template's, else its tokenizer's pairs."""
    if prompt is None:
        return PairTokenizer(tokenizer_file, max_query_tokens, max_length)
    return PromptTokenizer(tokenizer_file, prompt, max_query_tokens, max_length)


def load_pair_encoder(model: ModelDir) -> PairTokenizer | PromptTokenizer:
    """A model directory's pair tokeniser."""
    meta = model.metadata
    return pair_encoder(model.tokenizer_path, meta.prompt, meta.max_query_tokens, meta.max_length)
