"""Admission: room for pairs, held by permits that give it back themselves.

One :class:`Admission` bounds the pairs a model has in hand (being tokenised, queued or scored):
interactive requests at ``max_pairs``, batch requests at ``max_batch_pairs``, apart, so batch
work never takes the room interactive work needs. With API keys (``fair_keys``), a key that
already holds room may hold at most its fair share of a bound, ``bound / (keys holding room +
1)``: a key flooding the server is refused (429) while room for one more key's request is
always left, and a key that holds nothing is judged against the bound alone, so a lone client
is never refused a request the bound admits.

A request gets a :class:`Permit` for its pairs before any work is done for it, or is refused at
once (503, or 429 over a key's share), so a refusal costs nothing. The permit travels with the
request as an argument: the pipeline resizes it once the real count is known (chunked windows,
cache hits), the queue splits off each batch's share when it dispatches one (so pairs in the
engine keep their room until the engine gives them back, even if their request is abandoned
meanwhile), and every permit gives its room back exactly once: on ``release``, or on leaving
its ``async with`` block however the block ends.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from enum import StrEnum

from prometheus_client import Gauge

from crossrank.core.errors import ErrorType, ServiceError, engine_stalled
from crossrank.ops.metrics import ModelMetrics


class Priority(StrEnum):
    """A request's class: interactive work is served first; batch work fills idle capacity."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class _Room:
    """One bound on pairs, and what each key holds of it."""

    def __init__(self, max_pairs: int, reserved_gauge: Gauge, capacity_gauge: Gauge) -> None:
        self.max_pairs = max_pairs
        self.reserved = 0
        self.held: Counter[str] = Counter()  # by key, for those that hold any
        self._gauge = reserved_gauge
        capacity_gauge.set(max_pairs)

    def fair_share(self, tenant: str) -> int:
        holders = len(self.held) + (tenant not in self.held)
        return self.max_pairs // (holders + 1)

    def add(self, pairs: int, tenant: str | None) -> None:
        self.reserved += pairs
        self._gauge.set(self.reserved)
        if tenant is not None:
            self.held[tenant] += pairs
            if self.held[tenant] <= 0:
                del self.held[tenant]


class Admission:
    def __init__(
        self,
        max_pairs: int,
        metrics: ModelMetrics,
        stalled: Callable[[], bool] = lambda: False,
        drain_seconds: Callable[[int], float | None] = lambda pairs: None,
        *,
        max_batch_pairs: int | None = None,
        fair_keys: bool = False,
    ) -> None:
        self.max_pairs = max_pairs
        self._rooms = {
            Priority.INTERACTIVE: _Room(max_pairs, metrics.reserved_pairs, metrics.queue_capacity),
            Priority.BATCH: _Room(
                max_pairs if max_batch_pairs is None else max_batch_pairs,
                metrics.batch_reserved_pairs,
                metrics.batch_queue_capacity,
            ),
        }
        self._fair_keys = fair_keys
        self._stalled = stalled  # the engine hung (crossrank.core.worker): refuse new work
        # How long the engine takes to score so many pairs (None: not measured yet): a refusal
        # tells the client when the room it asks for could be free.
        self._drain_seconds = drain_seconds
        self.draining = False
        self._empty = asyncio.Event()
        self._empty.set()

    @property
    def reserved(self) -> int:
        """Room held by open permits, of every class."""
        return sum(room.reserved for room in self._rooms.values())

    def drain(self) -> None:
        """Admit nothing more; what holds a permit is still served."""
        self.draining = True

    def refusal(
        self,
        pairs: int | None = None,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str | None = None,
    ) -> ServiceError | None:
        """Why ``pairs`` more pairs of ``priority`` for the key ``tenant`` would be refused
        now, or None. ``pairs`` None: a request not yet counted, of at least one pair (refused
        only when no room at all is left)."""
        if self.draining:
            return ServiceError(ErrorType.SHUTTING_DOWN, "the service is shutting down")
        if self._stalled():
            return engine_stalled()
        room = self._rooms[priority]
        reserved, bound = room.reserved, room.max_pairs
        if pairs is None and reserved >= bound:
            return ServiceError(
                ErrorType.QUEUE_FULL,
                f"the {priority} queue is full ({reserved} pairs, its bound): retry later",
                retry_after_s=self._wait(priority, reserved),
            )
        if pairs is not None and reserved + pairs > bound:
            return ServiceError(
                ErrorType.QUEUE_FULL,
                f"the {priority} queue holds {reserved} pairs; {pairs} more would exceed its "
                f"bound of {bound}: retry later",
                # Room for the request frees up as the pairs ahead of it are scored.
                retry_after_s=self._wait(priority, reserved + pairs - bound),
            )
        if pairs and tenant is not None and self._fair_keys:
            return self._over_share(room, pairs, priority, tenant)
        return None

    def _over_share(
        self, room: _Room, pairs: int, priority: Priority, tenant: str
    ) -> ServiceError | None:
        held, share = room.held[tenant], room.fair_share(tenant)
        if held == 0 or held + pairs <= share:
            return None
        return ServiceError(
            ErrorType.KEY_OVER_SHARE,
            f"this API key holds {held} pairs of the {priority} queue; {pairs} more would "
            f"exceed its fair share of {share} while {len(room.held)} keys use it: retry later",
            retry_after_s=self._wait(priority, held + pairs - share),
        )

    def _wait(self, priority: Priority, pairs: int) -> float | None:
        """Seconds until ``pairs`` pairs of ``priority`` are scored: batch pairs wait for the
        interactive ones too."""
        if priority is Priority.BATCH:
            pairs += self._rooms[Priority.INTERACTIVE].reserved
        return self._drain_seconds(pairs)

    def acquire(
        self,
        pairs: int,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str | None = None,
    ) -> Permit:
        """A permit holding room for ``pairs``, or the refusal raised."""
        self._take(pairs, priority, tenant)
        return Permit(self, pairs, priority, tenant)

    async def wait_empty(self) -> None:
        """Until every permit has given its room back."""
        await self._empty.wait()

    def _take(self, pairs: int, priority: Priority, tenant: str | None) -> None:
        error = self.refusal(pairs, priority, tenant)
        if error is not None:
            raise error
        self._add(pairs, priority, tenant)

    def _add(self, pairs: int, priority: Priority, tenant: str | None) -> None:
        self._rooms[priority].add(pairs, tenant)
        if self.reserved:
            self._empty.clear()
        else:
            self._empty.set()


class Permit:
    """Room for ``pairs`` pairs of one class and key, held until released. An async (or plain)
    context manager that releases on exit; releasing again gives nothing back twice."""

    __slots__ = ("_admission", "pairs", "priority", "tenant")

    def __init__(
        self, admission: Admission, pairs: int, priority: Priority, tenant: str | None
    ) -> None:
        self._admission = admission
        self.pairs = pairs
        self.priority = priority
        self.tenant = tenant

    def resize(self, pairs: int) -> None:
        """Hold ``pairs``: growing is admitted as :meth:`Admission.acquire` would admit it (or
        refused, keeping what was held); shrinking gives the difference back."""
        if pairs > self.pairs:
            self._admission._take(pairs - self.pairs, self.priority, self.tenant)
        else:
            self._admission._add(pairs - self.pairs, self.priority, self.tenant)
        self.pairs = pairs

    def split(self, pairs: int) -> Permit:
        """Move ``pairs`` of this permit's room into a new permit (never refused: the room is
        already held)."""
        if not 0 <= pairs <= self.pairs:
            raise ValueError(f"cannot split {pairs} pairs off a permit of {self.pairs}")
        self.pairs -= pairs
        return Permit(self._admission, pairs, self.priority, self.tenant)

    def release(self) -> None:
        held, self.pairs = self.pairs, 0
        if held:
            self._admission._add(-held, self.priority, self.tenant)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
