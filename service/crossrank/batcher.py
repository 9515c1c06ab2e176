"""The dynamic batcher: admission, one queue of pairs, batches into the engine, results back.

Stages, as in TEI's queue/infer split:

* **admission** (:meth:`Batcher.reserve`, in the request's task, before tokenisation): a
  request reserves queue room for its passage count, known from the parsed body, and is refused
  with 503 if that would overflow ``max_queued_pairs`` or the service is draining, so a refusal
  costs no tokenisation. The room is held while the request is tokenised, queued and scored, and
  given back pair by pair as its pairs are scored, fail or are dropped;
* **batching** (one task, :meth:`Batcher._loop`, the only writer of the queue's state between
  awaits): asks :mod:`crossrank.scheduling` which pairs to send and when, and pads the next batch
  while the current one runs — re-planning it if the queue changes before the engine is free, so
  a short request that arrives meanwhile is not locked out of it;
* **inference** (one worker thread; onnxruntime releases the GIL): logits are scattered back into
  each request's score array, and a request's future resolves when its last pair is scored.

A request whose deadline passes or whose client disconnects is abandoned: its queued pairs are
dropped before inference and counted. If the engine raises, only the requests in that batch fail;
a one-pair probe then tells whether the engine itself is broken (``healthy``). If a batch does not
come back at all, the watchdog (:mod:`crossrank.watchdog`) marks the engine stalled: the loop
fails every queued request with 503 and admission refuses new ones until the batch returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from crossrank.collate import PaddedBatch, pad_pairs
from crossrank.engine import Engine
from crossrank.errors import ErrorType, ServiceError
from crossrank.metrics import Metrics
from crossrank.scheduling import BatchLimits, BatchPlan, RequestView, dispatch_delay, plan_batch
from crossrank.tokenization import EncodedPair
from crossrank.watchdog import WatchdogLimits, expected_seconds, stall_deadline, updated_speed

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Reservation:
    """Queue room held for one request: from before its tokenisation until each of its pairs is
    scored, failed or dropped."""

    pairs: int  # room still held


@dataclass(eq=False)
class _Request:
    key: int
    reservation: Reservation
    admitted_at: float
    deadline: float
    pairs: Sequence[EncodedPair]
    lengths: list[int]
    pending: list[int]  # positions not yet dispatched, in serving order
    sorted_desc: bool
    future: asyncio.Future[np.ndarray]
    logits: np.ndarray = field(init=False)
    outstanding: int = field(init=False)  # pairs not yet scored: pending + in flight
    first_dispatch_at: float | None = None
    scored_at: float | None = None

    def __post_init__(self) -> None:
        self.logits = np.empty(len(self.pairs), dtype=np.float32)
        self.outstanding = len(self.pairs)

    def view(self) -> RequestView:
        return RequestView(self.key, self.admitted_at, self.pending, self.lengths, self.sorted_desc)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A client's handle on its admitted request."""

    _request: _Request

    @property
    def pairs(self) -> int:
        return len(self._request.pairs)

    def timings(self) -> tuple[float, float]:
        """Seconds (queued, in inference) of a scored request: from admission to its first
        batch, and from then to its last pair scored."""
        r = self._request
        if r.first_dispatch_at is None or r.scored_at is None:
            raise ValueError("the request has not been scored")
        return r.first_dispatch_at - r.admitted_at, r.scored_at - r.first_dispatch_at


@dataclass(slots=True)
class _Prepared:
    version: int
    plan: BatchPlan
    rows: list[tuple[_Request, list[int]]]
    batch: PaddedBatch


class Batcher:
    def __init__(
        self,
        engine: Engine,
        limits: BatchLimits,
        *,
        max_queued_pairs: int,
        length_sorting: bool,
        metrics: Metrics,
        probe: Sequence[EncodedPair],
        watchdog: WatchdogLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._max_queued = max_queued_pairs
        self._length_sorting = length_sorting
        self._metrics = metrics
        self._probe = pad_pairs(probe)
        self._clock = clock
        self._requests: dict[int, _Request] = {}
        self._keys = itertools.count()
        self._queued = 0  # pairs admitted and not yet dispatched
        self._reserved = 0  # room held by reservations: tokenising, queued or in the engine
        self._version = 0  # bumped on every change of the queue: a prepared batch is stale
        self._wake = asyncio.Event()
        self._inflight: asyncio.Task[None] | None = None
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-engine")
        self._task: asyncio.Task[None] | None = None
        self.healthy = True
        self._watchdog = watchdog
        self._seconds_per_token: float | None = None  # the engine's measured speed
        self._inflight_since: float | None = None  # when the batch in the engine was sent
        self._inflight_deadline = float("inf")  # when it counts as stalled
        self.stalled_since: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    def begin_drain(self) -> None:
        """Stop admitting; what was admitted is still served."""
        self._draining = True

    async def close(self) -> None:
        """Drain: refuse new work, finish what was admitted, then stop."""
        self.begin_drain()
        await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def queued_pairs(self) -> int:
        return self._queued

    @property
    def reserved_pairs(self) -> int:
        return self._reserved

    # -- admission ---------------------------------------------------------------------------

    def refusal(self, pairs: int | None = None) -> ServiceError | None:
        """Why a request of ``pairs`` pairs would be refused now, or None. ``pairs`` None: a
        request not yet read, of at least one pair (refused only when no room is left)."""
        if self._draining:
            return ServiceError(ErrorType.SHUTTING_DOWN, "the service is shutting down")
        if self.stalled_since is not None:
            return self._stalled_error()
        if pairs is None and self._reserved >= self._max_queued:
            return ServiceError(
                ErrorType.QUEUE_FULL,
                f"the queue is full ({self._reserved} pairs, its bound): retry later",
            )
        if pairs is not None and self._reserved + pairs > self._max_queued:
            return ServiceError(
                ErrorType.QUEUE_FULL,
                f"the queue holds {self._reserved} pairs; {pairs} more would exceed its "
                f"bound of {self._max_queued}: retry later",
            )
        return None

    def reserve(self, pairs: int) -> Reservation:
        """Hold queue room for ``pairs`` pairs, or refuse (503) at once: called before any work
        is done for the request, so that a refusal costs nothing."""
        error = self.refusal(pairs)
        if error is not None:
            raise error
        self._reserved += pairs
        self._notify()
        return Reservation(pairs)

    def resize(self, reservation: Reservation, pairs: int) -> None:
        """Make ``reservation`` hold ``pairs``: more is admitted (or refused, 503, keeping what
        it held) as :meth:`reserve` would admit it; less is given back."""
        if pairs > reservation.pairs:
            error = self.refusal(pairs - reservation.pairs)
            if error is not None:
                raise error
            self._reserved += pairs - reservation.pairs
            reservation.pairs = pairs
            self._notify()
        else:
            self.release(reservation, reservation.pairs - pairs)

    def release(self, reservation: Reservation, pairs: int | None = None) -> None:
        """Give back ``pairs`` of a reservation's room (all of it when None)."""
        n = reservation.pairs if pairs is None else min(pairs, reservation.pairs)
        if n <= 0:
            return
        reservation.pairs -= n
        self._reserved -= n
        self._notify()

    def admit(
        self, reservation: Reservation, pairs: Sequence[EncodedPair], timeout_s: float
    ) -> Ticket:
        """Queue a tokenised request in the room it reserved (never refused: reserving was the
        admission, so a drain that began meanwhile still serves it)."""
        if len(pairs) != reservation.pairs:
            raise ValueError(f"{len(pairs)} pairs admitted on a reservation of {reservation.pairs}")
        now = self._clock()
        lengths = [p.length for p in pairs]
        order = list(range(len(pairs)))
        if self._length_sorting:
            order.sort(key=lambda i: -lengths[i])
        request = _Request(
            key=next(self._keys),
            reservation=reservation,
            admitted_at=now,
            deadline=now + timeout_s,
            pairs=pairs,
            lengths=lengths,
            pending=order,
            sorted_desc=self._length_sorting,
            future=asyncio.get_running_loop().create_future(),
        )
        self._requests[request.key] = request
        self._queued += len(pairs)
        self._changed()
        return Ticket(request)

    async def wait(self, ticket: Ticket) -> np.ndarray:
        """The request's logits by pair position; 504 at its deadline, abandoned on cancel."""
        request = ticket._request
        try:
            async with asyncio.timeout(request.deadline - self._clock()):
                return await asyncio.shield(request.future)
        except TimeoutError:
            self.abandon(ticket, "deadline")
            raise ServiceError(
                ErrorType.DEADLINE_EXCEEDED, "the request's deadline passed before it was scored"
            ) from None
        except asyncio.CancelledError:
            self.abandon(ticket, "disconnected")
            raise

    def abandon(self, ticket: Ticket, reason: str) -> None:
        """Forget a request: its queued pairs are dropped, in-flight results discarded."""
        self._forget(ticket._request, reason, None)
        self._changed()

    def _forget(self, request: _Request, reason: str, error: ServiceError | None) -> None:
        """Take a request out of the queue, counting its undispatched pairs as dropped for
        ``reason``, and end its future: with ``error``, or cancelled."""
        if self._requests.pop(request.key, None) is None:
            return
        dropped = len(request.pending)
        if dropped:
            self._metrics.dropped_pairs.labels(reason).inc(dropped)
            self._queued -= dropped
            request.pending = []
            self.release(request.reservation, dropped)
        if request.future.done():
            return
        if error is None:
            request.future.cancel()
        else:
            request.future.set_exception(error)

    def _changed(self) -> None:
        """The queue changed: a prepared batch must be re-planned."""
        self._version += 1
        self._notify()

    def _notify(self) -> None:
        self._metrics.queue_depth.set(self._queued)
        self._metrics.reserved_pairs.set(self._reserved)
        if self._requests or self._inflight is not None or self._reserved:
            self._idle.clear()
        else:
            self._idle.set()
        self._wake.set()

    # -- batching ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self._serve()
            except Exception:
                # A bug here must not leave every admitted request hanging until its deadline.
                error_id = uuid.uuid4().hex[:12]
                log.exception("batcher failure %s: failing the queued requests", error_id)
                error = ServiceError(
                    ErrorType.INTERNAL, f"internal error (id {error_id})", error_id=error_id
                )
                for request in list(self._requests.values()):
                    if request.pending:
                        self._forget(request, "failed", error)
                self._changed()

    async def _serve(self) -> None:
        prepared: _Prepared | None = None
        while True:
            self._wake.clear()
            now = self._clock()
            if self._inflight is not None and now >= self._inflight_deadline:
                self._stall(now)
            if prepared is None or prepared.version != self._version:
                prepared = self._prepare(now)
            if self._inflight is not None or prepared is None:
                # Engine busy (the next batch is ready beside it) or nothing to do; wake for
                # the watchdog too, while the batch in the engine is not yet overdue.
                watch = self._inflight_deadline - now if self.stalled_since is None else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(watch):
                        await self._wake.wait()
                continue
            delay = dispatch_delay(prepared.plan, now, self._limits.max_wait_s)
            if delay:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            self._dispatch(prepared, now)
            prepared = None

    def _prepare(self, now: float) -> _Prepared | None:
        views = [r.view() for r in self._requests.values() if r.pending]
        plan = plan_batch(views, now, self._limits)
        if plan.pairs == 0:
            return None
        rows = [(self._requests[key], positions) for key, positions in plan.take.items()]
        batch = pad_pairs([r.pairs[p] for r, positions in rows for p in positions])
        return _Prepared(self._version, plan, rows, batch)

    def _dispatch(self, prepared: _Prepared, now: float) -> None:
        m = self._metrics
        for request, positions in prepared.rows:
            taken = set(positions)
            request.pending = [p for p in request.pending if p not in taken]
            if request.first_dispatch_at is None:
                request.first_dispatch_at = now
            m.queue_wait.observe(now - request.admitted_at)
        self._queued -= prepared.plan.pairs
        batch = prepared.batch
        m.batch_pairs.observe(batch.pairs)
        m.batch_padded_tokens.observe(batch.padded_tokens)
        m.padding_efficiency.observe(batch.real_tokens / batch.padded_tokens)
        self._inflight_since = now
        expected = expected_seconds(self._seconds_per_token, batch.padded_tokens)
        self._inflight_deadline = stall_deadline(now, expected, self._watchdog)
        self._inflight = asyncio.get_running_loop().create_task(self._infer(prepared))
        self._changed()

    # -- inference ---------------------------------------------------------------------------

    async def _run_engine(self, batch: PaddedBatch) -> np.ndarray:
        loop = asyncio.get_running_loop()
        started = self._clock()
        logits = await loop.run_in_executor(self._executor, self._engine.run, batch)
        if logits.shape != (batch.pairs,):
            raise RuntimeError(f"engine returned shape {logits.shape} for {batch.pairs} pairs")
        self._seconds_per_token = updated_speed(
            self._seconds_per_token, self._clock() - started, batch.padded_tokens
        )
        return logits

    async def _infer(self, prepared: _Prepared) -> None:
        m = self._metrics
        batch = prepared.batch
        started = self._clock()
        try:
            logits = await self._run_engine(batch)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.exception("engine failure %s on a batch of %d pairs", error_id, batch.pairs)
            m.engine_failures.inc()
            error = ServiceError(
                ErrorType.ENGINE_FAILURE,
                f"the model failed on a batch holding this request (error id {error_id})",
                error_id=error_id,
            )
            # Probe first, so that a client told of the failure sees /ready already right.
            await self._check_health()
            self._fail(prepared, error, exc)
        else:
            m.batch_inference.observe(self._clock() - started)
            m.pairs.inc(batch.pairs)
            m.tokens.inc(batch.real_tokens)
            self._set_healthy(True)
            self._scatter(prepared, logits)
        finally:
            # Completion alone leaves the queue as it was: the batch prepared meanwhile stands.
            self._inflight = None
            self._inflight_since = None
            self._inflight_deadline = float("inf")
            if self.stalled_since is not None:
                log.warning("the stalled batch came back: admitting requests again")
                self.stalled_since = None
            self._notify()

    def _scatter(self, prepared: _Prepared, logits: np.ndarray) -> None:
        row = 0
        for request, positions in prepared.rows:
            n = len(positions)
            request.logits[positions] = logits[row : row + n]
            row += n
            request.outstanding -= n
            # Also for a request abandoned meanwhile: its pairs held their room until now.
            self.release(request.reservation, n)
            if request.outstanding == 0 and not request.future.done():
                request.scored_at = self._clock()
                self._requests.pop(request.key, None)
                request.future.set_result(request.logits)

    def _fail(self, prepared: _Prepared, error: ServiceError, cause: Exception) -> None:
        error.__cause__ = cause
        for request, positions in prepared.rows:
            self.release(request.reservation, len(positions))
            self._forget(request, "failed", error)
        self._version += 1

    async def _check_health(self) -> None:
        """After a failed batch: does the engine still score a known-good pair?"""
        try:
            await self._run_engine(self._probe)
        except Exception:
            log.exception("engine probe failed: marking the engine unhealthy")
            self._set_healthy(False)
        else:
            self._set_healthy(True)

    # -- watchdog ----------------------------------------------------------------------------

    def _stalled_error(self) -> ServiceError:
        return ServiceError(
            ErrorType.ENGINE_STALLED,
            "the model has not answered a batch within its time bound: retry on another replica",
        )

    def _stall(self, now: float) -> None:
        """The batch in the engine is overdue: fail everything queued rather than let it wait
        to its deadline, and refuse new requests until the batch comes back."""
        if self.stalled_since is not None or self._inflight_since is None:
            return
        self.stalled_since = now
        log.error(
            "engine stalled: a batch has run %.1f s, over its bound of %.1f s",
            now - self._inflight_since,
            self._inflight_deadline - self._inflight_since,
        )
        self._metrics.engine_stalls.inc()
        self._metrics.engine_healthy.set(0)
        error = self._stalled_error()
        for request in list(self._requests.values()):
            self._forget(request, "stalled", error)
        self._changed()

    def stuck_for(self, now: float) -> float:
        """Seconds the batch in the engine has run, once it counts as stalled (else 0)."""
        if self.stalled_since is None or self._inflight_since is None:
            return 0.0
        return now - self._inflight_since

    def _set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self._metrics.engine_healthy.set(1 if healthy else 0)

    async def warm_up(self, batches: Sequence[PaddedBatch]) -> None:
        """Run each batch once (before the service reports ready); raises if the engine does."""
        for batch in batches:
            await self._run_engine(batch)
        self._set_healthy(True)
