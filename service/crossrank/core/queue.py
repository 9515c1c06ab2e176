"""The queue of pairs: tokenised requests wait here until their pairs are batched into the engine.

One task owns the queue (:meth:`PairQueue._loop`). Requests hand it commands through its inbox
(a new request, a request to drop); it alone plans each batch (:mod:`crossrank.core.scheduling`,
pure functions of a snapshot of the queue), pads the next batch while the worker runs the
current one (re-planned if the queue changed meanwhile, so a short request that arrives is not
locked out of it), dispatches it, and scatters the logits back into each request's scores. A
request's future resolves when its last pair is scored.

Room (:mod:`crossrank.core.admission`): a queued request's permit holds room for its pairs not
yet dispatched; a dispatched batch takes its pairs' share into permits of its own, given back
when the engine is done with them. A request whose deadline passes or whose client goes away is
dropped: its queued pairs never reach the engine and their room is given back at once. A failed
batch fails only its own requests; a stalled engine (the worker's watchdog) fails everything
queued with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from crossrank.core.admission import Permit, Priority
from crossrank.core.cost import Backlog
from crossrank.core.errors import ErrorType, ServiceError, engine_stalled
from crossrank.core.scheduling import (
    BatchLimits,
    BatchPlan,
    RequestView,
    dispatch_delay,
    next_batch_turn,
    plan_batch,
)
from crossrank.core.worker import Worker
from crossrank.model.collate import PaddedBatch, pad_pairs
from crossrank.model.tokenization import EncodedPair
from crossrank.ops.metrics import ModelMetrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Entry:
    """One queued request."""

    key: int
    permit: Permit  # room of the pairs not yet dispatched
    admitted_at: float
    deadline: float
    pairs: Sequence[EncodedPair]
    lengths: list[int]
    pending: list[int]  # positions not yet dispatched, in serving order
    sorted_desc: bool
    future: asyncio.Future[np.ndarray]
    logits: np.ndarray = field(init=False)
    scored: np.ndarray = field(init=False)  # which positions' logits are in
    outstanding: int = field(init=False)  # pairs not yet scored: pending + in the engine
    first_dispatch_at: float | None = None
    scored_at: float | None = None
    batches: int = 0  # batches its pairs went in
    padded_tokens: int = 0  # its pairs' share of those batches' padded tokens

    def __post_init__(self) -> None:
        self.logits = np.empty(len(self.pairs), dtype=np.float32)
        self.scored = np.zeros(len(self.pairs), dtype=bool)
        self.outstanding = len(self.pairs)

    def view(self) -> RequestView:
        return RequestView(
            self.key,
            self.admitted_at,
            self.pending,
            self.lengths,
            self.sorted_desc,
            batch=self.permit.priority is Priority.BATCH,
            tenant=self.permit.tenant,
        )


@dataclass(frozen=True, slots=True)
class Queued:
    """What a request's pairs went through in the queue: seconds queued (to their first batch)
    and in inference (from then to the last pair scored), the batches they went in and their
    padded tokens there."""

    queue_s: float = 0.0
    inference_s: float = 0.0
    batches: int = 0
    padded_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Ticket:
    """A client's handle on its queued request."""

    _entry: Entry

    def queued(self, now: float) -> Queued:
        """Its passage through the queue, up to ``now`` for a request cut short by its budget."""
        e = self._entry
        end = now if e.scored_at is None else e.scored_at
        if e.first_dispatch_at is None:
            return Queued(end - e.admitted_at)
        first = e.first_dispatch_at
        return Queued(first - e.admitted_at, end - first, e.batches, e.padded_tokens)


@dataclass(frozen=True, slots=True)
class _Drop:
    entry: Entry
    reason: str  # the dropped_pairs label


@dataclass(slots=True)
class _Batch:
    version: int  # the queue's version it was planned on: stale once the queue changes
    plan: BatchPlan
    rows: list[tuple[Entry, list[int]]]
    padded: PaddedBatch


@dataclass(slots=True)
class _Running:
    batch: _Batch
    permits: list[Permit]  # the room of its pairs, until the engine is done with them
    task: asyncio.Task[np.ndarray]


class PairQueue:
    def __init__(
        self,
        worker: Worker,
        limits: BatchLimits,
        *,
        length_sorting: bool,
        metrics: ModelMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._worker = worker
        self._limits = limits
        self._length_sorting = length_sorting
        # Commands from requests, taken by the owning task; it wakes for them and for a batch
        # coming back from the worker.
        self._inbox: deque[Entry | _Drop] = deque()
        self._wake = asyncio.Event()
        self._metrics = metrics
        self._clock = clock
        self._entries: dict[int, Entry] = {}
        self._keys = itertools.count()
        self._queued = 0  # pairs queued and not yet dispatched
        # The same pairs by class and length, priced: the wait ahead of a new request.
        self.backlog = Backlog(worker.cost)
        self._version = 0  # bumped on every change of the queue
        self._running: _Running | None = None
        self._batch_turn = False  # aged batch work may have the next batch (next_batch_turn)
        self._stall_pending = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pair-queue")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the requests' side ---------------------------------------------------------------------

    def submit(
        self,
        permit: Permit,
        pairs: Sequence[EncodedPair],
        timeout_s: float,
        in_order: bool = False,
    ) -> Ticket:
        """Queue a tokenised request on the permit holding its pairs' room (never refused:
        acquiring the permit was the admission); the permit's priority and API key place it
        (crossrank.core.scheduling). ``in_order``: its pairs are served in the
        order sent (a budgeted request's first-stage top first), not longest first."""
        if len(pairs) != permit.pairs:
            raise ValueError(f"{len(pairs)} pairs queued on a permit of {permit.pairs}")
        now = self._clock()
        lengths = [p.length for p in pairs]
        order = list(range(len(pairs)))
        sort = self._length_sorting and not in_order
        if sort:
            order.sort(key=lambda i: -lengths[i])
        entry = Entry(
            key=next(self._keys),
            permit=permit,
            admitted_at=now,
            deadline=now + timeout_s,
            pairs=pairs,
            lengths=lengths,
            pending=order,
            sorted_desc=sort,
            future=asyncio.get_running_loop().create_future(),
        )
        self._send(entry)
        return Ticket(entry)

    async def wait(self, ticket: Ticket) -> np.ndarray:
        """The request's logits by pair position; deadline_exceeded at its deadline. Either
        way, and on cancellation, its queued pairs are dropped."""
        entry = ticket._entry
        try:
            async with asyncio.timeout(entry.deadline - self._clock()):
                return await asyncio.shield(entry.future)
        except TimeoutError:
            self._send(_Drop(entry, "deadline"))
            raise ServiceError(
                ErrorType.DEADLINE_EXCEEDED, "the request's deadline passed before it was scored"
            ) from None
        except asyncio.CancelledError:
            self._send(_Drop(entry, "disconnected"))
            raise

    async def wait_within(self, ticket: Ticket, budget_s: float) -> tuple[np.ndarray, np.ndarray]:
        """The request's logits by pair position and which of them are in: all of them, or, at
        ``budget_s``, those scored by then, its queued pairs dropped and their room given back
        (pairs in the engine then are discarded when they come back)."""
        entry = ticket._entry
        try:
            async with asyncio.timeout(budget_s):
                logits = await asyncio.shield(entry.future)
                return logits, np.ones(len(logits), dtype=bool)
        except TimeoutError:
            self._send(_Drop(entry, "budget"))
            return entry.logits.copy(), entry.scored.copy()
        except asyncio.CancelledError:
            self._send(_Drop(entry, "disconnected"))
            raise

    def stall(self) -> None:
        """The worker's watchdog found the engine hung: fail everything queued."""
        self._stall_pending = True
        self._wake.set()

    def _send(self, command: Entry | _Drop) -> None:
        self._inbox.append(command)
        self._wake.set()

    # -- the owning task ------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self._serve()
            except Exception:
                # A bug here must not leave every queued request hanging until its deadline.
                error_id = uuid.uuid4().hex[:12]
                log.exception("queue failure %s: failing the queued requests", error_id)
                error = ServiceError(ErrorType.INTERNAL, f"internal error (id {error_id})")
                for entry in list(self._entries.values()):
                    if entry.pending:
                        self._drop(entry, "failed", error)

    async def _serve(self) -> None:
        batch: _Batch | None = None
        while True:
            self._wake.clear()
            self._take_commands()
            if self._running is not None and self._running.task.done():
                self._finish(self._running)
                self._running = None
            if batch is None or batch.version != self._version:
                batch = self._prepare(self._clock())
            # The engine is busy (the next batch is ready beside it) or nothing is queued.
            if self._running is not None or batch is None:
                await self._wake.wait()
                continue
            now = self._clock()
            delay = dispatch_delay(batch.plan, now, self._limits.max_wait_s)
            if delay:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            self._dispatch(batch, now)
            batch = None

    def _take_commands(self) -> None:
        while self._inbox:
            command = self._inbox.popleft()
            if isinstance(command, _Drop):
                self._drop(command.entry, command.reason)
            else:
                self._entries[command.key] = command
                self._queued += len(command.pending)
                self.backlog.add(
                    command.key, command.permit.priority, command.deadline, command.lengths
                )
                self._changed()
        if self._stall_pending:
            self._stall_pending = False
            error = engine_stalled()
            for entry in list(self._entries.values()):
                self._drop(entry, "stalled", error)

    def _prepare(self, now: float) -> _Batch | None:
        views = [e.view() for e in self._entries.values() if e.pending]
        plan = plan_batch(views, now, self._limits, self._batch_turn)
        if plan.pairs == 0:
            return None
        rows = [(self._entries[key], positions) for key, positions in plan.take.items()]
        padded = pad_pairs([e.pairs[p] for e, positions in rows for p in positions])
        return _Batch(self._version, plan, rows, padded)

    def _dispatch(self, batch: _Batch, now: float) -> None:
        padded, permits = batch.padded, []
        for entry, positions in batch.rows:
            taken = set(positions)
            entry.pending = [p for p in entry.pending if p not in taken]
            self.backlog.remove(entry.key, [entry.lengths[p] for p in positions])
            if entry.first_dispatch_at is None:
                entry.first_dispatch_at = now
            entry.batches += 1
            entry.padded_tokens += len(positions) * padded.input_ids.shape[1]
            self._metrics.queue_wait.observe(now - entry.admitted_at)
            permits.append(entry.permit.split(len(positions)))
        self._queued -= batch.plan.pairs
        done = [(e.permit.priority is Priority.BATCH, not e.pending) for e, _ in batch.rows]
        self._batch_turn = next_batch_turn(self._batch_turn, done)
        observe_batch(self._metrics, padded)
        task = asyncio.get_running_loop().create_task(self._worker.run(padded))
        task.add_done_callback(lambda _: self._wake.set())
        self._running = _Running(batch, permits, task)
        self._changed()

    def _finish(self, running: _Running) -> None:
        for permit in running.permits:
            permit.release()  # the engine is done with these pairs
        error = running.task.exception()
        if error is not None:
            for entry, _ in running.batch.rows:
                self._drop(entry, "failed", error)
            return
        logits = running.task.result()
        row = 0
        for entry, positions in running.batch.rows:
            n = len(positions)
            entry.logits[positions] = logits[row : row + n]
            entry.scored[positions] = True
            row += n
            entry.outstanding -= n
            # A request dropped meanwhile is gone already: its future is done.
            if entry.outstanding == 0 and not entry.future.done():
                entry.scored_at = self._clock()
                self._entries.pop(entry.key, None)
                entry.future.set_result(entry.logits)

    def _drop(self, entry: Entry, reason: str, error: BaseException | None = None) -> None:
        """Take a request out of the queue, its undispatched pairs counted as dropped for
        ``reason`` and their room given back; its future ends with ``error``, or cancelled."""
        if self._entries.pop(entry.key, None) is None:
            return
        dropped = len(entry.pending)
        self.backlog.discard(entry.key)
        if dropped:
            self._metrics.dropped[reason].inc(dropped)
            self._queued -= dropped
            entry.pending = []
        entry.permit.release()
        if not entry.future.done():
            if error is None:
                entry.future.cancel()
            else:
                entry.future.set_exception(error)
        self._changed()

    def _changed(self) -> None:
        """The queue changed: a prepared batch must be planned again."""
        self._version += 1
        self._metrics.queue_depth.set(self._queued)


def observe_batch(metrics: ModelMetrics, padded: PaddedBatch) -> None:
    metrics.batch_pairs.observe(padded.pairs)
    metrics.batch_padded_tokens.observe(padded.padded_tokens)
    metrics.padding_efficiency.observe(padded.real_tokens / padded.padded_tokens)
