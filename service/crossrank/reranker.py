"""Scoring one (query, passages) request: reserve queue room, tokenise off the loop, batch,
rank."""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from crossrank.batcher import Batcher
from crossrank.chunking import Aggregation, aggregate
from crossrank.errors import ErrorType, ServiceError, invalid
from crossrank.metrics import Metrics
from crossrank.model_dir import Activation, Calibration
from crossrank.priority import lower_current_thread
from crossrank.request_context import current
from crossrank.score_cache import ScoreCache
from crossrank.tokenization import (
    Chunking,
    ChunkingError,
    EncodedRequest,
    InstructionError,
    PairEncoder,
    PassageTooLongError,
    QueryTooLongError,
)


@dataclass(frozen=True, slots=True)
class LongPassages:
    """How a request treats passages over the model's window (the server's defaults, each
    overridable per request)."""

    chunk: bool
    stride: int
    aggregation: Aggregation
    max_chunks: int

    def override(
        self, mode: str | None, aggregation: str | None, max_chunks: int | None
    ) -> LongPassages:
        return LongPassages(
            self.chunk if mode is None else mode == "chunk",
            self.stride,
            self.aggregation if aggregation is None else Aggregation(aggregation),
            self.max_chunks if max_chunks is None else max_chunks,
        )


@dataclass(frozen=True, slots=True)
class Ranked:
    order: np.ndarray  # passage indices, best first
    scores: np.ndarray  # score of each passage, by index
    pairs: int
    tokens: int
    truncated: int
    chunks: int  # pairs scored: windows when chunked
    # Chunked: per passage, the window that scored it (number, first char, one past its last).
    spans: list[tuple[int, int, int]] | None = None

    def span(self, index: int) -> dict[str, int] | None:
        if self.spans is None:
            return None
        chunk, start, end = self.spans[index]
        return {"chunk": chunk, "start": start, "end": end}

    def best(self, limit: int | None, min_score: float | None = None) -> list[tuple[int, float]]:
        """(index, score) of the best ``limit`` passages (all when None) scoring at least
        ``min_score``, best first."""
        order = self.order.tolist()
        if min_score is not None:
            # Scores are monotone in the logits ranked by: the passing ones are a prefix.
            order = [i for i in order if self.scores[i] >= min_score]
        return [(index, float(self.scores[index])) for index in order[:limit]]


def rank(logits: np.ndarray) -> np.ndarray:
    """Indices by logit descending, ties by index ascending (a stable, reproducible order)."""
    return np.lexsort((np.arange(logits.shape[0]), -logits))


class Reranker:
    def __init__(
        self,
        tokenizer: PairEncoder,
        batcher: Batcher,
        activation: Activation,
        metrics: Metrics,
        *,
        calibration: Calibration | None = None,
        max_passages: int,
        default_timeout_ms: int,
        long_passages: LongPassages,
        cache: ScoreCache | None = None,
        nice: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._batcher = batcher
        self._activation = activation
        self._calibration = calibration
        self._metrics = metrics
        self._max_passages = max_passages
        self._default_timeout_ms = default_timeout_ms
        self.long_passages = long_passages
        self._cache = cache
        # Tokenisation runs beside inference: its own thread, so it never queues behind a batch;
        # like inference, it yields the CPU to the event loop (``nice``, crossrank.priority).
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="crossrank-tokenize",
            initializer=lower_current_thread,
            initargs=(nice,),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def _encode(
        self,
        query: str,
        passages: list[str],
        truncate: bool,
        passages_field: str,
        instruction: str | None,
        max_passage_tokens: int | None,
        chunking: Chunking | None,
    ) -> EncodedRequest:
        started = time.monotonic()
        encode = functools.partial(
            self._tokenizer.encode,
            query,
            passages,
            truncate,
            instruction,
            max_passage_tokens=max_passage_tokens,
            chunking=chunking,
        )
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(self._pool, encode)
        except InstructionError as exc:
            raise invalid(str(exc), "instruction") from None
        except ChunkingError as exc:
            raise invalid(str(exc), "long_passages") from None
        except QueryTooLongError as exc:
            raise invalid(
                f"query has {exc.tokens} tokens, over the model's budget of {exc.budget}; "
                "shorten it or send truncate=true",
                "query",
            ) from None
        except PassageTooLongError as exc:
            field = f"{passages_field}[{exc.index}]"
            raise invalid(
                f"{field} makes a pair of {exc.tokens} tokens, over the model's max length of "
                f"{exc.max_length}; shorten it or send truncate=true",
                field,
            ) from None
        self._metrics.tokenization.observe(time.monotonic() - started)
        return encoded

    async def _cached(
        self, encoded: EncodedRequest
    ) -> tuple[list[bytes] | None, np.ndarray, list[int]]:
        """The pairs' keys, their logits (the cache's, where it has them) and the positions
        the cache does not answer."""
        logits = np.zeros(len(encoded.pairs), dtype=np.float32)
        if self._cache is None:
            return None, logits, list(range(len(encoded.pairs)))
        keys = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._cache.keys, encoded.pairs
        )
        missing = []
        for i, logit in enumerate(self._cache.get(keys)):
            if logit is None:
                missing.append(i)
            else:
                logits[i] = logit
        return keys, logits, missing

    def scores(self, logits: np.ndarray, raw_scores: bool) -> np.ndarray:
        """What a client sees: the logit when asked for it, else the calibrated probability,
        else (an uncalibrated model) the model's own activation of the logit."""
        if raw_scores:
            return logits
        if self._calibration is not None:
            return self._calibration.probability(logits)
        if self._activation is Activation.IDENTITY:
            return logits
        # The tanh form of the sigmoid cannot overflow.
        return 0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64)))

    async def score(
        self,
        query: str,
        passages: list[str],
        *,
        raw_scores: bool,
        truncate: bool,
        timeout_ms: int | None,
        passages_field: str,
        instruction: str | None = None,
        long_passages: LongPassages | None = None,
        max_passage_tokens: int | None = None,
    ) -> Ranked:
        arrived = time.monotonic()
        long_passages = long_passages or self.long_passages
        if len(passages) > self._max_passages:
            raise invalid(
                f"{len(passages)} passages sent; this server takes at most {self._max_passages}",
                passages_field,
            )
        chunking = (
            Chunking(long_passages.stride, long_passages.max_chunks)
            if long_passages.chunk
            else None
        )
        # Admission before any work: a refusal costs no tokenisation. Chunked, the room is an
        # upper bound on the pairs (max_chunks windows a passage, max_passages pairs in all);
        # what the windows do not use is given back once they are cut.
        bound = len(passages)
        if chunking is not None:
            bound = min(len(passages) * chunking.max_chunks, self._max_passages)
        record = current()
        reservation = record.reservation if record is not None else None
        if reservation is None:
            reservation = self._batcher.reserve(bound)
        else:
            record.reservation = None  # this request's now: released below however it ends
            try:
                self._batcher.resize(reservation, bound)
            except BaseException:
                self._batcher.release(reservation)
                raise
        try:
            encoded = await self._encode(
                query,
                passages,
                truncate,
                passages_field,
                instruction,
                max_passage_tokens,
                chunking,
            )
            if len(encoded.pairs) > bound:
                raise invalid(
                    f"{len(passages)} passages make {len(encoded.pairs)} windows; this server "
                    f"scores at most {self._max_passages} pairs a request: send fewer passages "
                    "or a lower max_chunks_per_doc",
                    passages_field,
                )
            keys, logits, missing = await self._cached(encoded)
            # The room of pairs the cache answered (and of windows never cut) is given back:
            # only the misses are queued.
            self._batcher.release(reservation, bound - len(missing))
            timeout_s = (timeout_ms or self._default_timeout_ms) / 1000
            remaining = timeout_s - (time.monotonic() - arrived)
            if remaining <= 0:
                raise ServiceError(
                    ErrorType.DEADLINE_EXCEEDED, "the request's deadline passed during tokenisation"
                )
            ticket = None
            if missing:
                queued = [encoded.pairs[i] for i in missing]
                ticket = self._batcher.admit(reservation, queued, remaining)
        except BaseException:
            # Refused, failed or cancelled before it was queued: nothing holds its room.
            self._batcher.release(reservation)
            raise
        if record is not None:
            record.passages = len(passages)
            record.tokens = encoded.tokens
        if ticket is not None:
            self._metrics.inflight_requests.inc()
            try:
                scored = await self._batcher.wait(ticket)
            finally:
                self._metrics.inflight_requests.dec()
            logits[missing] = scored
            if self._cache is not None and keys is not None:
                self._cache.put([keys[i] for i in missing], scored.tolist())
            if record is not None:
                queued_s, inference_s = ticket.timings()
                record.queue_ms = 1000 * queued_s
                record.inference_ms = 1000 * inference_s
        spans = None
        if encoded.owners is not None and encoded.spans is not None:
            logits, best = aggregate(
                logits, encoded.owners, len(passages), long_passages.aggregation
            )
            first = np.searchsorted(np.asarray(encoded.owners), np.arange(len(passages)))
            spans = [
                (int(w - f), *encoded.spans[w])
                for w, f in zip(best.tolist(), first.tolist(), strict=True)
            ]
        scores = self.scores(logits, raw_scores)
        # Rank by logit: the sigmoid saturates to equal scores for large, different logits.
        return Ranked(
            rank(logits),
            scores,
            len(passages),
            encoded.tokens,
            encoded.truncated,
            len(encoded.pairs),
            spans,
        )
