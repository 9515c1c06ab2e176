"""Latency budgets: a request that sends ``budget_ms`` (or meets the server's
``default_budget_ms``) is answered by then with what could be scored, rather than failed.

Its pairs are queued in the order sent (the first stage's best first), and when the budget
passes its queued pairs are dropped: the answer holds the scored passages first, by score,
then the unscored ones in the order they were sent. When the queue ahead of it would outlast
the budget at the engine's recent speed, nothing is queued and the answer comes at once, in
first-stage order.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossrank.core.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Budget:
    until: float  # monotonic seconds

    def remaining(self, now: float) -> float:
        return self.until - now

    def affords(self, now: float, wait_s: float | None) -> bool:
        """Whether anything could be scored in time, given the queue's expected wait ahead
        (None: not measured yet, so try)."""
        left = self.remaining(now)
        return left > 0 and (wait_s is None or wait_s < left)


def budget_for(
    budget_ms: int | None, timeout_ms: int, chunked: bool, arrived: float
) -> Budget | None:
    """The request's budget (None: none), or a 422 naming budget_ms."""
    if budget_ms is None:
        return None
    if budget_ms > timeout_ms:
        raise InvalidInput(
            f"{budget_ms} ms is above the request's deadline of {timeout_ms} ms (timeout_ms): "
            "a budget must end before it",
            "budget_ms",
        )
    if chunked:
        raise InvalidInput(
            "a budget does not combine with long_passages chunk: a passage's windows would "
            "be scored in part",
            "budget_ms",
        )
    return Budget(arrived + budget_ms / 1000)
