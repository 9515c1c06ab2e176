"""Admission: room for pairs, held by permits that give it back themselves.

One :class:`Admission` bounds the pairs a model has in hand (being tokenised, queued or scored)
at ``max_pairs``. A request gets a :class:`Permit` for its pairs before any work is done for it,
or is refused at once (503), so a refusal costs nothing. The permit travels with the request as
an argument: the pipeline resizes it once the real count is known (chunked windows, cache hits),
the queue splits off each batch's share when it dispatches one (so pairs in the engine keep their
room until the engine gives them back, even if their request is abandoned meanwhile), and every
permit gives its room back exactly once: on ``release``, or on leaving its ``async with``
block however the block ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from crossrank.core.errors import ErrorType, ServiceError, engine_stalled
from crossrank.ops.metrics import ModelMetrics


class Admission:
    def __init__(
        self,
        max_pairs: int,
        metrics: ModelMetrics,
        stalled: Callable[[], bool] = lambda: False,
        drain_seconds: Callable[[int], float | None] = lambda pairs: None,
    ) -> None:
        self.max_pairs = max_pairs
        self._metrics = metrics
        self._stalled = stalled  # the engine hung (crossrank.core.worker): refuse new work
        # How long the engine takes to score so many pairs (None: not measured yet): a refusal
        # tells the client when the room it asks for could be free.
        self._drain_seconds = drain_seconds
        self.reserved = 0  # room held by open permits
        self.draining = False
        self._empty = asyncio.Event()
        self._empty.set()
        metrics.queue_capacity.set(max_pairs)

    def drain(self) -> None:
        """Admit nothing more; what holds a permit is still served."""
        self.draining = True

    def refusal(self, pairs: int | None = None) -> ServiceError | None:
        """Why ``pairs`` more pairs would be refused now, or None. ``pairs`` None: a request not
        yet counted, of at least one pair (refused only when no room at all is left)."""
        if self.draining:
            return ServiceError(ErrorType.SHUTTING_DOWN, "the service is shutting down")
        if self._stalled():
            return engine_stalled()
        if pairs is None and self.reserved >= self.max_pairs:
            return ServiceError(
                ErrorType.QUEUE_FULL,
                f"the queue is full ({self.reserved} pairs, its bound): retry later",
                retry_after_s=self._drain_seconds(self.reserved),
            )
        if pairs is not None and self.reserved + pairs > self.max_pairs:
            return ServiceError(
                ErrorType.QUEUE_FULL,
                f"the queue holds {self.reserved} pairs; {pairs} more would exceed its "
                f"bound of {self.max_pairs}: retry later",
                # Room for the request frees up as the pairs ahead of it are scored.
                retry_after_s=self._drain_seconds(self.reserved + pairs - self.max_pairs),
            )
        return None

    def acquire(self, pairs: int) -> Permit:
        """A permit holding room for ``pairs``, or the refusal raised."""
        self._take(pairs)
        return Permit(self, pairs)

    async def wait_empty(self) -> None:
        """Until every permit has given its room back."""
        await self._empty.wait()

    def _take(self, pairs: int) -> None:
        error = self.refusal(pairs)
        if error is not None:
            raise error
        self._add(pairs)

    def _add(self, pairs: int) -> None:
        self.reserved += pairs
        self._metrics.reserved_pairs.set(self.reserved)
        if self.reserved:
            self._empty.clear()
        else:
            self._empty.set()


class Permit:
    """Room for ``pairs`` pairs, held until released. An async (or plain) context manager that
    releases on exit; releasing again gives nothing back twice."""

    __slots__ = ("_admission", "pairs")

    def __init__(self, admission: Admission, pairs: int) -> None:
        self._admission = admission
        self.pairs = pairs

    def resize(self, pairs: int) -> None:
        """Hold ``pairs``: growing is admitted as :meth:`Admission.acquire` would admit it (or
        refused, keeping what was held); shrinking gives the difference back."""
        if pairs > self.pairs:
            self._admission._take(pairs - self.pairs)
        else:
            self._admission._add(pairs - self.pairs)
        self.pairs = pairs

    def split(self, pairs: int) -> Permit:
        """Move ``pairs`` of this permit's room into a new permit (never refused: the room is
        already held)."""
        if not 0 <= pairs <= self.pairs:
            raise ValueError(f"cannot split {pairs} pairs off a permit of {self.pairs}")
        self.pairs -= pairs
        return Permit(self._admission, pairs)

    def release(self) -> None:
        held, self.pairs = self.pairs, 0
        if held:
            self._admission._add(-held)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
