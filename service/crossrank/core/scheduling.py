"""The batching decisions, as pure functions of a snapshot of the queue (no I/O, no clock reads).

Two questions are answered here, and only here:

* :func:`plan_batch` — which queued pairs form the next batch. Interactive requests take part
  while there are any, batch requests when there are none (so batch work delays interactive
  work by at most the batch running when it arrives), except that batch requests that have
  waited ``batch_aging_s`` get one batch after each interactive request (:func:`urgent`): aged
  batch work advances even under a steady interactive load, and an interactive request waits
  for one such batch at most.
  Within the class, the API keys come first whose queued work, discounted by the age of their
  oldest request over ``batch_aging_s``, is least (a key flooding the queue is served after a
  key sending little), and
  within a key requests are ranked by their remaining work, discounted by age
  (shortest-remaining-first with aging): a 10-passage request that arrives behind a
  1,000-passage one is served in the next batch instead of after all 1,000 pairs, and an old
  request's rank improves until nothing can starve it. Without API keys every request is of one
  key and the key's rank decides nothing. The best-ranked request
  (the *head*) contributes its pairs in its serving order (longest first when length sorting is
  on), which fixes the batch's padded length; the remaining room goes to the other requests in
  rank order, taking only pairs no longer than that padded length, longest first, so padding stays
  small. The budget counts padding: ``padded_length * pairs <= max_batch_tokens``.
* :func:`dispatch_delay` — send the planned batch now, or wait how long for it to fill.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

# max_batch_tokens when the settings leave it at 0, per device. Measured on the CPU here
# (`python -m bench.run`, engine batch-size sweep): pairs/s fall beyond ~1,000 padded tokens, as a
# batch's activations outgrow the caches, and small batches keep a short request from waiting long
# behind a long one. A GPU needs large batches to fill its cores (bench/README.md, "GPU").
AUTO_BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_tokens: int
    max_batch_pairs: int
    max_wait_s: float
    aging_s: float
    batch_aging_s: float = float("inf")


@dataclass(frozen=True, slots=True)
class RequestView:
    """What the planner sees of one queued request."""

    key: int  # unique, increasing with admission order (the tie-breaker)
    admitted_at: float  # monotonic seconds
    pending: Sequence[int]  # positions of its queued pairs, in serving order
    lengths: Sequence[int]  # token length of every pair of the request, by position
    # True when `pending` is sorted by length, longest first, which lets fillers be found by
    # bisection instead of a scan.
    sorted_desc: bool
    batch: bool = False  # batch priority: served when no interactive work is queued
    tenant: str | None = None  # the API key that sent it


@dataclass(slots=True)
class BatchPlan:
    take: dict[int, list[int]] = field(default_factory=dict)  # request key -> positions
    pairs: int = 0
    padded_length: int = 0
    full: bool = False  # stopped for lack of room, not for lack of pairs
    oldest_admitted_at: float = float("inf")


def rank_key(view: RequestView, now: float, aging_s: float) -> tuple[float, int]:
    """Smaller is served sooner: remaining pairs, discounted by age."""
    age = max(0.0, now - view.admitted_at)
    return (len(view.pending) / (1.0 + age / aging_s), view.key)


def urgent(
    requests: Sequence[RequestView], now: float, limits: BatchLimits, batch_turn: bool
) -> list[RequestView]:
    """The requests the next batch is planned from: interactive ones while there are any;
    batch ones when there are none; and batch ones aged past ``batch_aging_s`` when it is their
    turn (``batch_turn``: an interactive request has been wholly dispatched since their last
    batch), so aged batch work advances by a batch per interactive request at least, and an
    interactive request waits for one such batch at most."""
    interactive = [r for r in requests if not r.batch]
    aged = [r for r in requests if r.batch and now - r.admitted_at >= limits.batch_aging_s]
    if aged and (not interactive or batch_turn):
        return aged
    return interactive or list(requests)


def next_batch_turn(turn: bool, rows: Sequence[tuple[bool, bool]]) -> bool:
    """Whether aged batch work may have the batch after one whose requests were ``rows``
    (each: batch priority?, wholly dispatched now?): not right after a batch of its own; yes
    once an interactive request has been wholly dispatched."""
    if all(batch for batch, _ in rows):
        return False
    return turn or any(not batch and whole for batch, whole in rows)


def key_ranks(
    requests: Sequence[RequestView], now: float, aging_s: float
) -> dict[str | None, float]:
    """Each API key's rank (smaller is served sooner): its queued pairs, discounted by the age
    of its oldest queued request over ``aging_s``."""
    pending: dict[str | None, int] = {}
    oldest: dict[str | None, float] = {}
    for r in requests:
        pending[r.tenant] = pending.get(r.tenant, 0) + len(r.pending)
        oldest[r.tenant] = min(oldest.get(r.tenant, now), r.admitted_at)
    return {
        tenant: pairs / (1.0 + max(0.0, now - oldest[tenant]) / aging_s)
        for tenant, pairs in pending.items()
    }


def _fits(plan: BatchPlan, length: int, limits: BatchLimits) -> bool:
    if plan.pairs >= limits.max_batch_pairs:
        return False
    padded = max(plan.padded_length, length)
    return padded * (plan.pairs + 1) <= limits.max_batch_tokens


def _add(plan: BatchPlan, view: RequestView, position: int) -> None:
    length = view.lengths[position]
    plan.take.setdefault(view.key, []).append(position)
    plan.pairs += 1
    plan.padded_length = max(plan.padded_length, length)
    plan.oldest_admitted_at = min(plan.oldest_admitted_at, view.admitted_at)


def _take_head(plan: BatchPlan, head: RequestView, limits: BatchLimits) -> None:
    for position in head.pending:
        # A pair longer than the whole budget still runs, alone: it must not wait forever.
        if plan.pairs and not _fits(plan, head.lengths[position], limits):
            plan.full = True
            return
        _add(plan, head, position)


def _take_filler(plan: BatchPlan, view: RequestView, limits: BatchLimits) -> None:
    if view.sorted_desc:
        # pending is longest-first; skip the pairs longer than the padded length.
        negated = [-view.lengths[p] for p in view.pending]
        start = bisect.bisect_left(negated, -plan.padded_length)
        candidates = view.pending[start:]
    else:
        candidates = view.pending
    for position in candidates:
        if not _fits(plan, view.lengths[position], limits):
            if view.sorted_desc or plan.pairs >= limits.max_batch_pairs:
                plan.full = True
                return
            continue
        _add(plan, view, position)


def plan_batch(
    requests: Sequence[RequestView],
    now: float,
    limits: BatchLimits,
    batch_turn: bool = False,
) -> BatchPlan:
    """Choose the next batch from the queued requests (see the module docstring);
    ``batch_turn``: aged batch work may have this batch (:func:`urgent`)."""
    plan = BatchPlan()
    live = urgent([r for r in requests if r.pending], now, limits, batch_turn)
    if not live:
        return plan
    # Keys yield on the slower horizon of batch work: a heavy key's old requests must not
    # outrank a light key's new one within seconds.
    keys = key_ranks(live, now, limits.batch_aging_s)
    ranked = sorted(live, key=lambda r: (keys[r.tenant], *rank_key(r, now, limits.aging_s)))
    _take_head(plan, ranked[0], limits)
    for view in ranked[1:]:
        if plan.full:
            break
        _take_filler(plan, view, limits)
    # Full also when not even one more pair of the padded length would fit.
    if plan.pairs >= limits.max_batch_pairs or not _fits(plan, 0, limits):
        plan.full = True
    return plan


def dispatch_delay(plan: BatchPlan, now: float, max_wait_s: float) -> float | None:
    """Seconds to wait before sending ``plan``: 0 = now, ``None`` = nothing to send.

    A full batch goes at once; otherwise it may wait for more pairs, but never longer than
    ``max_wait_s`` after its oldest pair was admitted.
    """
    if plan.pairs == 0:
        return None
    if plan.full:
        return 0.0
    return max(0.0, plan.oldest_admitted_at + max_wait_s - now)
