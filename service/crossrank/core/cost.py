"""What a pair costs the engine, by its length, learnt from measured batches (no clock reads).

A pair's cost is not its token count times a constant: attention grows with the square of the
length, and a batch of short pairs pays more per token for its fixed overheads. Every batch runs
at one padded length, so its seconds per pair is the price of a pair of that length. The table
keeps that price smoothed per power-of-two length bucket (the warm-up runs a full batch of every
bucket, so each is measured before the first request), and prices a pair from its bucket, or,
while its bucket is unmeasured, from the nearest measured bucket scaled by length.

The queue (crossrank.core.queue) sums it over its queued pairs: the wait ahead of a budgeted
request, and how much of that request its budget can pay for (crossrank.features.budget).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from crossrank.core.admission import Priority
from crossrank.core.watchdog import updated_speed

SMALLEST_BUCKET = 16


def bucket(length: int) -> int:
    """The power of two at or above ``length`` (at least SMALLEST_BUCKET)."""
    size = SMALLEST_BUCKET
    while size < length:
        size *= 2
    return size


class PairCost:
    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}  # seconds per pair, by bucket

    @property
    def measured(self) -> bool:
        return bool(self._seconds)

    def observe(self, padded_length: int, pairs: int, seconds: float) -> None:
        """A batch of ``pairs`` pairs padded to ``padded_length`` took ``seconds``."""
        key = bucket(padded_length)
        # Smoothed as the worker's speed is: one slow batch moves the price 20%.
        self._seconds[key] = updated_speed(self._seconds.get(key), seconds, pairs)

    def seconds(self, length: int) -> float | None:
        """The price of one pair of ``length`` tokens (None before any batch was measured)."""
        if not self._seconds:
            return None
        key = bucket(length)
        if key in self._seconds:
            return self._seconds[key]
        nearest = min(self._seconds, key=lambda measured: abs(measured - key))
        return self._seconds[nearest] * key / nearest

    def total(self, buckets: Counter[int]) -> float | None:
        """The price of pairs counted by bucket (None before any batch was measured)."""
        if not self._seconds:
            return None
        return sum(count * (self.seconds(key) or 0.0) for key, count in buckets.items())

    def prefix_within(self, lengths: list[int], seconds: float) -> int:
        """How many of the pairs of ``lengths``, taken in order, ``seconds`` pays for (all of
        them before any batch was measured)."""
        if not self._seconds:
            return len(lengths)
        spent = 0.0
        for taken, length in enumerate(lengths):
            spent += self.seconds(length) or 0.0
            if spent > seconds:
                return taken
        return len(lengths)


class Backlog:
    """The queued requests' pairs by length bucket, priced by ``cost``: the wait ahead of a new
    request. A request ahead holds the engine no longer than until its deadline (a budget's
    end drops its queued pairs), so it counts for no more than the time it has left, and the
    queue ahead for no longer than its latest deadline."""

    def __init__(self, cost: PairCost) -> None:
        self.cost = cost
        # request key -> (its priority, its deadline, its queued pairs by bucket)
        self._requests: dict[int, tuple[Priority, float, Counter[int]]] = {}

    def add(self, key: int, priority: Priority, deadline: float, lengths: Iterable[int]) -> None:
        buckets = Counter(bucket(n) for n in lengths)
        if buckets:
            self._requests[key] = (priority, deadline, buckets)

    def remove(self, key: int, lengths: Iterable[int]) -> None:
        """Some of a request's pairs left the queue (dispatched)."""
        buckets = self._requests[key][2]
        buckets.subtract(bucket(n) for n in lengths)
        if buckets.total() <= 0:
            del self._requests[key]

    def discard(self, key: int) -> None:
        """A request left the queue (dropped, failed)."""
        self._requests.pop(key, None)

    def wait_seconds(self, priority: Priority, now: float) -> float | None:
        """How long the engine takes on the work queued ahead of a new request of
        ``priority``: interactive requests, and for batch work batch ones too, each for at most
        the time it has left, and all of them for no longer than the last of them has left
        (None before any batch was measured)."""
        if not self.cost.measured:
            return None
        wait = latest = 0.0
        for ahead, deadline, buckets in self._requests.values():
            if ahead is Priority.INTERACTIVE or priority is Priority.BATCH:
                left = max(0.0, deadline - now)
                wait += min(self.cost.total(buckets) or 0.0, left)
                latest = max(latest, left)
        return min(wait, latest)
