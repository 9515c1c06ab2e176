"""The engine's worker: runs one batch at a time on its own thread, knows how fast the engine
is, and notices when it is not well.

* A batch runs on the worker's one thread (onnxruntime releases the GIL), timed: the engine's
  recent speed (seconds per padded token) sets how long the next batch may take.
* **Watchdog**: a batch still running past its bound (:mod:`crossrank.core.watchdog`) marks the
  engine *stalled*: the queue fails what it holds with 503 and admission refuses new requests,
  until the batch comes back.
* **Health**: a batch that raises fails only its own requests; a one-pair probe then tells
  whether the engine itself is broken (``healthy``, which ``/ready`` reports).
* **Turns**: with several models in one process, their workers may share a lock (the
  ``engine_sharing: turns`` setting) so that one engine at a time has the cores; a batch's
  watchdog bound starts once it has its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from crossrank.core.cost import PairCost
from crossrank.core.errors import ErrorType, ServiceError
from crossrank.core.watchdog import WatchdogLimits, expected_seconds, stall_deadline, updated_speed
from crossrank.model.collate import PaddedBatch
from crossrank.model.engine import Engine
from crossrank.ops.metrics import ModelMetrics

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        engine: Engine,
        metrics: ModelMetrics,
        *,
        probe: PaddedBatch,
        watchdog: WatchdogLimits,
        on_stall: Callable[[], None] = lambda: None,
        turns: asyncio.Lock | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-engine")
        self._metrics = metrics
        self._probe = probe
        self._watchdog = watchdog
        # Told when the engine stalls: the queue fails what it holds (set once both exist).
        self.on_stall = on_stall
        self._turns = turns  # shared with the other models' workers; None: run at once
        self._clock = clock
        self._seconds_per_token: float | None = None
        self._seconds_per_pair: float | None = None
        self.cost = PairCost()  # a pair's price by its length, from the batches measured
        self._running_since: float | None = None  # the batch in the engine, if any
        self.stalled_since: float | None = None
        self.healthy = True

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    @property
    def stalled(self) -> bool:
        return self.stalled_since is not None

    def stuck_for(self, now: float) -> float:
        """Seconds the batch in the engine has run, once it counts as stalled (else 0)."""
        if self.stalled_since is None or self._running_since is None:
            return 0.0
        return now - self._running_since

    async def run(self, batch: PaddedBatch) -> np.ndarray:
        """The batch's logits; an engine_failure error (after the health probe) if it raises."""
        async with self._turns or contextlib.nullcontext():
            return await self._run(batch)

    async def _run(self, batch: PaddedBatch) -> np.ndarray:
        started = self._clock()
        try:
            logits = await self._watched(batch, started)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.exception("engine failure %s on a batch of %d pairs", error_id, batch.pairs)
            self._metrics.engine_failures.inc()
            # Probe first, so that a client told of the failure sees /ready already right.
            await self._check_health()
            raise ServiceError(
                ErrorType.ENGINE_FAILURE,
                f"the model failed on a batch holding this request (error id {error_id})",
            ) from exc
        m = self._metrics
        m.batch_inference.observe(self._clock() - started)
        m.pairs.inc(batch.pairs)
        m.tokens.inc(batch.real_tokens)
        self._set_healthy(True)
        return logits

    async def warm_up(self, batches: Sequence[PaddedBatch]) -> None:
        """Run each batch once (before the service reports ready); raises if the engine does."""
        for batch in batches:
            async with self._turns or contextlib.nullcontext():
                await self._timed(batch)
        self._set_healthy(True)

    def fail_warm_up(self) -> None:
        self._set_healthy(False)

    async def _watched(self, batch: PaddedBatch, started: float) -> np.ndarray:
        """Run ``batch``; past its bound, mark the engine stalled and go on waiting for it."""
        expected = expected_seconds(self._seconds_per_token, batch.padded_tokens)
        bound = stall_deadline(started, expected, self._watchdog) - started
        self._running_since = started
        running = asyncio.ensure_future(self._timed(batch))
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(running), bound)
            except TimeoutError:
                self._stall(bound)
                return await running
        finally:
            self._running_since = None
            if self.stalled_since is not None:
                log.warning("the stalled batch came back: admitting requests again")
                self.stalled_since = None

    async def _timed(self, batch: PaddedBatch) -> np.ndarray:
        loop = asyncio.get_running_loop()
        started = self._clock()
        logits = await loop.run_in_executor(self._executor, self._engine.run, batch)
        if logits.shape != (batch.pairs,):
            raise RuntimeError(f"engine returned shape {logits.shape} for {batch.pairs} pairs")
        spent = self._clock() - started
        self._seconds_per_token = updated_speed(self._seconds_per_token, spent, batch.padded_tokens)
        self._seconds_per_pair = updated_speed(self._seconds_per_pair, spent, batch.pairs)
        self.cost.observe(batch.padded_tokens // max(1, batch.pairs), batch.pairs, spent)
        return logits

    def drain_seconds(self, pairs: int) -> float | None:
        """How long the engine takes to score ``pairs`` pairs at its recent speed (None before
        it has run a batch)."""
        return None if self._seconds_per_pair is None else pairs * self._seconds_per_pair

    def _stall(self, bound: float) -> None:
        self.stalled_since = self._clock()
        log.error("engine stalled: a batch has run over its bound of %.1f s", bound)
        self._metrics.engine_stalls.inc()
        self._metrics.engine_healthy.set(0)
        self.on_stall()

    async def _check_health(self) -> None:
        """After a failed batch: does the engine still score a known-good pair?"""
        try:
            await self._timed(self._probe)
        except Exception:
            log.exception("engine probe failed: marking the engine unhealthy")
            self._set_healthy(False)
        else:
            self._set_healthy(True)

    def _set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self._metrics.engine_healthy.set(1 if healthy else 0)
