"""Turning (query, passages) into the token ids of ``[CLS] query [SEP] passage [SEP]`` pairs.

The training package uses this same class, so a model is trained on exactly the inputs the
service will give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


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
    truncated: int  # pairs whose passage (or query) was cut

    @property
    def tokens(self) -> int:
        return sum(p.length for p in self.pairs)


class PairTokenizer:
    """Query truncated to ``max_query_tokens``; pair truncated longest-first to ``max_length``."""

    def __init__(self, tokenizer_file: str | Path, max_query_tokens: int, max_length: int) -> None:
        self.max_query_tokens = max_query_tokens
        self.max_length = max_length
        self._query_tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._query_tokenizer.no_truncation()
        self._query_tokenizer.no_padding()
        self._pair_tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._pair_tokenizer.no_padding()
        self._pair_tokenizer.enable_truncation(max_length, strategy="longest_first")

    def _cut_query(self, query: str, truncate: bool) -> tuple[str, bool]:
        encoding = self._query_tokenizer.encode(query, add_special_tokens=False)
        if len(encoding.ids) <= self.max_query_tokens:
            return query, False
        if not truncate:
            raise QueryTooLongError(len(encoding.ids), self.max_query_tokens)
        # Cut the text at the end of the last token that fits, so the pair tokenizer sees the
        # same query prefix for every passage.
        end = encoding.offsets[self.max_query_tokens - 1][1]
        return query[:end], True

    def encode(self, query: str, passages: list[str], truncate: bool = True) -> EncodedRequest:
        """Blocking (runs Rust code that releases the GIL): call it off the event loop."""
        query, query_cut = self._cut_query(query, truncate)
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
            elif query_cut:
                truncated += 1
            pairs.append(
                EncodedPair(
                    np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.type_ids, dtype=np.int64)
                )
            )
        return EncodedRequest(pairs, truncated)

    def _full_length(self, query: str, passage: str) -> int:
        return len(self._query_tokenizer.encode(query, passage).ids)
