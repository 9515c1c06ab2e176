"""Scoring one request, step by step: check it, grow its permit to its bound, tokenise (off the
event loop), take what the score cache knows, queue the rest and wait for their logits, then
aggregate windows and rank. Every step is a method a reader need not scroll; the request's
permit (crossrank.core.admission) comes in as an argument, and so does its trace, which the
pipeline fills in step by step for the HTTP layer to log and measure."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from crossrank.core.admission import Permit
from crossrank.core.errors import ErrorType, InvalidInput, ServiceError
from crossrank.core.queue import PairQueue, Queued
from crossrank.core.ranking import Ranked, ScoreScale, Trace, rank
from crossrank.features.budget import Budget, budget_for
from crossrank.features.chunking import LongPassages, pair_bound, passage_scores
from crossrank.features.score_cache import ScoreCache
from crossrank.model.tokenization import (
    EncodedPair,
    EncodedRequest,
    PairTokenizer,
    PassageTooLongError,
    PromptTokenizer,
    QueryTooLongError,
    WindowTokenizer,
)
from crossrank.ops.metrics import ModelMetrics
from crossrank.ops.priority import lower_current_thread


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """What a client asks, whatever route it came by."""

    query: str
    passages: list[str]
    raw_scores: bool = False
    truncate: bool = True
    timeout_ms: int | None = None
    instruction: str | None = None
    max_passage_tokens: int | None = None
    budget_ms: int | None = None  # answer by then with what is scored (None: the server's)
    # Long passages: None keeps the server's default.
    long_passages: str | None = None  # "truncate" or "chunk"
    chunk_aggregation: str | None = None
    max_chunks_per_doc: int | None = None


class Pipeline:
    def __init__(
        self,
        encoder: PairTokenizer | PromptTokenizer,
        windows: WindowTokenizer | None,
        queue: PairQueue,
        scale: ScoreScale,
        metrics: ModelMetrics,
        *,
        max_passages: int,
        default_timeout_ms: int,
        long_passages: LongPassages,
        default_budget_ms: int = 0,
        cache: ScoreCache | None = None,
        nice: int = 0,
    ) -> None:
        self._encoder = encoder
        # What the model's tokeniser can do beyond plain pairs (None: it cannot).
        self._instructed = (
            encoder if isinstance(encoder, PromptTokenizer) and encoder.takes_instruction else None
        )
        self._windows = windows
        self._queue = queue
        self._scale = scale
        self._metrics = metrics
        self._max_passages = max_passages
        self._default_timeout_ms = default_timeout_ms
        self._default_budget_ms = default_budget_ms or None
        self.long_passages = long_passages  # the server's defaults
        self._cache = cache
        # Tokenise on a thread of its own, yielding the CPU as inference does (ops.priority).
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="crossrank-tokenize",
            initializer=lower_current_thread,
            initargs=(nice,),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def score(self, request: ScoreRequest, permit: Permit, trace: Trace) -> Ranked:
        """Rank ``request``'s passages; ``permit`` is grown to the request's pairs (or the
        request refused) before any work, and shrunk to what is queued; ``trace`` records what
        each step cost."""
        arrived = time.monotonic()
        long = self.long_passages.override(
            request.long_passages, request.chunk_aggregation, request.max_chunks_per_doc
        )
        timeout_ms = request.timeout_ms or self._default_timeout_ms
        budget_ms = request.budget_ms
        if budget_ms is None and self._default_budget_ms is not None and not long.chunk:
            # The server's budget yields to what the client asked: its deadline, chunking.
            budget_ms = min(self._default_budget_ms, timeout_ms)
        budget = budget_for(budget_ms, timeout_ms, long.chunk, arrived)
        permit.resize(self._bound(request, long))
        encoded, tokenize_s = await self._tokenize(request, long, trace)
        trace.passages, trace.tokens = len(request.passages), encoded.tokens
        trace.tokenize_ms = 1000 * tokenize_s
        self._check_pairs(request, encoded, permit.pairs)
        keys, logits, missing = await self._cached(encoded)
        permit.resize(len(missing))
        known = np.ones(len(logits), dtype=bool)
        if missing:
            pairs = [encoded.pairs[i] for i in missing]
            trace.queue_at = time.monotonic()
            if budget is None:
                deadline = arrived + timeout_ms / 1000
                scored, queued = await self._infer(permit, pairs, deadline)
                done = np.ones(len(missing), dtype=bool)
            else:
                scored, done, queued = await self._infer_within(permit, pairs, budget)
            trace.queued(queued)
            logits[missing] = scored
            known[missing] = done
            if self._cache is not None and keys is not None:
                fresh = [i for i, d in zip(missing, done.tolist(), strict=True) if d]
                self._cache.put([keys[i] for i in fresh], logits[fresh].tolist())
        ranked = self._ranked(request, long, encoded, logits, known if budget else None)
        if ranked.unscored:
            self._metrics.partial_answers.inc()
            self._metrics.unscored_pairs.inc(ranked.unscored)
        return ranked

    def _bound(self, request: ScoreRequest, long: LongPassages) -> int:
        """The most pairs the request can make: its admission is judged on that. Chunked, what
        the windows do not use is given back once they are cut."""
        count = len(request.passages)
        if count > self._max_passages:
            raise InvalidInput(
                f"{count} sent; this server takes at most {self._max_passages}", "passages"
            )
        if not long.chunk:
            return count
        return pair_bound(count, long.max_chunks, self._max_passages)

    def _tokenizer_call(
        self, request: ScoreRequest, long: LongPassages
    ) -> Callable[[], EncodedRequest]:
        """The encoder this request needs, bound to its arguments; a 422 if the model has none."""
        r = request
        if r.instruction is not None and self._instructed is None:
            raise InvalidInput("this model takes no instruction", "instruction")
        if long.chunk:
            if self._windows is None:
                raise InvalidInput(
                    "this model's pairs are one prompt text: it cannot chunk long passages",
                    "long_passages",
                )
            return functools.partial(
                self._windows.encode,
                r.query,
                r.passages,
                long.max_chunks,
                r.truncate,
                r.max_passage_tokens,
            )
        if r.instruction is not None and self._instructed is not None:
            return functools.partial(
                self._instructed.encode,
                r.query,
                r.passages,
                r.truncate,
                r.max_passage_tokens,
                instruction=r.instruction,
            )
        return functools.partial(
            self._encoder.encode, r.query, r.passages, r.truncate, r.max_passage_tokens
        )

    async def _tokenize(
        self, request: ScoreRequest, long: LongPassages, trace: Trace
    ) -> tuple[EncodedRequest, float]:
        call = self._tokenizer_call(request, long)
        started = trace.tokenize_at = time.monotonic()
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except QueryTooLongError as exc:
            raise InvalidInput(
                f"{exc.tokens} tokens, over the model's budget of {exc.budget}; shorten it or "
                "send truncate=true",
                "query",
            ) from None
        except PassageTooLongError as exc:
            raise InvalidInput(
                f"a pair of {exc.tokens} tokens, over the model's max length of "
                f"{exc.max_length}; shorten it or send truncate=true",
                "passages",
                exc.index,
            ) from None
        spent = time.monotonic() - started
        self._metrics.tokenization.observe(spent)
        return encoded, spent

    def _check_pairs(self, request: ScoreRequest, encoded: EncodedRequest, bound: int) -> None:
        if len(encoded.pairs) > bound:
            raise InvalidInput(
                f"{len(request.passages)} passages make {len(encoded.pairs)} windows; this "
                f"server scores at most {self._max_passages} pairs a request: send fewer "
                "passages or a lower max_chunks_per_doc",
                "passages",
            )

    async def _cached(
        self, encoded: EncodedRequest
    ) -> tuple[list[bytes] | None, np.ndarray, list[int]]:
        """The pairs' keys, their logits (the cache's, where it has them) and the positions
        the cache does not answer."""
        if self._cache is None:
            n = len(encoded.pairs)
            return None, np.zeros(n, dtype=np.float32), list(range(n))
        keys = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._cache.keys, encoded.pairs
        )
        return keys, *self._cache.lookup(keys)

    async def _infer(
        self, permit: Permit, pairs: list[EncodedPair], deadline: float
    ) -> tuple[np.ndarray, Queued]:
        """The pairs' logits from the queue, and their passage through it."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceError(
                ErrorType.DEADLINE_EXCEEDED, "the request's deadline passed during tokenisation"
            )
        ticket = self._queue.submit(permit, pairs, remaining)
        self._metrics.inflight_requests.inc()
        try:
            scored = await self._queue.wait(ticket)
        finally:
            self._metrics.inflight_requests.dec()
        return scored, ticket.queued(time.monotonic())

    async def _infer_within(
        self, permit: Permit, pairs: list[EncodedPair], budget: Budget
    ) -> tuple[np.ndarray, np.ndarray, Queued]:
        """What the queue scores of the pairs, in the order sent, by the budget's end: their
        logits, which are in, and their passage through the queue. Only the pairs the
        budget can pay for are queued (none when the queue ahead would outlast it)."""
        now = time.monotonic()
        logits, done = np.zeros(len(pairs), dtype=np.float32), np.zeros(len(pairs), dtype=bool)
        take = budget.affordable(
            now,
            self._queue.backlog.wait_seconds(permit.priority, now),
            [p.length for p in pairs],
            self._queue.backlog.cost,
        )
        permit.resize(take)
        if not take:
            return logits, done, Queued()
        ticket = self._queue.submit(permit, pairs[:take], budget.remaining(now), in_order=True)
        self._metrics.inflight_requests.inc()
        try:
            logits[:take], done[:take] = await self._queue.wait_within(
                ticket, budget.remaining(now)
            )
        finally:
            self._metrics.inflight_requests.dec()
        return logits, done, ticket.queued(time.monotonic())

    def _ranked(
        self,
        request: ScoreRequest,
        long: LongPassages,
        encoded: EncodedRequest,
        logits: np.ndarray,
        known: np.ndarray | None,
    ) -> Ranked:
        spans = None
        if encoded.owners is not None and encoded.spans is not None:
            logits, spans = passage_scores(
                logits,
                encoded.owners,
                encoded.spans,
                len(request.passages),
                long.aggregation,
            )
        # Rank by logit: the sigmoid saturates to equal scores for large, different logits.
        return Ranked(
            order=rank(logits, known),
            scores=self._scale.scores(logits, request.raw_scores),
            scored=known,
            pairs=len(request.passages),
            tokens=encoded.tokens,
            truncated=encoded.truncated,
            chunks=len(encoded.pairs),
            spans=spans,
        )
