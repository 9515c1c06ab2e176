"""Latency budgets: a request that sends ``budget_ms`` (or meets the server's
``default_budget_ms``) is answered by then with what could be scored, rather than failed.

Its pairs are queued in the order sent (the first stage's best first), and when the budget
passes its queued pairs are dropped: the answer holds the scored passages first, by score,
then the unscored ones in the order they were sent. Only the pairs the budget can pay for are
queued, priced by length (crossrank.core.cost), with headroom (OVERCOMMIT); the rest give
their room back at once. When the queue ahead of it would
outlast the budget, nothing is queued and the answer comes at once, in first-stage order.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossrank.core.cost import PairCost
from crossrank.core.errors import InvalidInput

# Queue this many times what the budget is priced to pay for: a price too high would leave
# unscored pairs the time could have scored, while one too low costs only pairs dropped at
# the budget's end.
OVERCOMMIT = 1.5


@dataclass(frozen=True, slots=True)
class Budget:
    until: float  # monotonic seconds

    def remaining(self, now: float) -> float:
        return self.until - now

    def affordable(
        self, now: float, wait_s: float | None, lengths: list[int], cost: PairCost
    ) -> int:
        """How many of the pairs of ``lengths``, in order, to queue: what the time left pays
        for, with OVERCOMMIT headroom; 0 when the queue's expected wait ahead (``wait_s``; None:
        not measured) would outlast it. The wait is not taken off the time left: the
        scheduler serves a request with less work left first, so a budgeted request's
        prefix often goes ahead of the queue that it would otherwise wait for."""
        left = self.remaining(now)
        if left <= 0 or (wait_s is not None and wait_s >= left):
            return 0
        return cost.prefix_within(lengths, OVERCOMMIT * left)


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
