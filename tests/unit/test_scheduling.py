"""The pure batching decisions."""

from __future__ import annotations

import pytest

from crossrank.core.scheduling import BatchLimits, RequestView, dispatch_delay, plan_batch, rank_key

LIMITS = BatchLimits(max_batch_tokens=1000, max_batch_pairs=8, max_wait_s=0.005, aging_s=2.0)


def view(key: int, lengths: list[int], admitted_at: float = 0.0, sort: bool = True) -> RequestView:
    order = (
        sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if sort
        else list(range(len(lengths)))
    )
    return RequestView(key, admitted_at, order, lengths, sorted_desc=sort)


def test_empty_queue_plans_nothing_and_waits_for_work() -> None:
    plan = plan_batch([], 0.0, LIMITS)
    assert plan.pairs == 0
    assert dispatch_delay(plan, 0.0, LIMITS.max_wait_s) is None


def test_budget_counts_padding() -> None:
    # Longest first: 300 sets the padded length; 3 x 300 = 900 fits, a 4th would make 1200.
    plan = plan_batch([view(0, [100, 300, 200, 250, 50])], 0.0, LIMITS)
    assert plan.take == {0: [1, 3, 2]}
    assert plan.padded_length == 300
    assert plan.padded_length * plan.pairs == 900
    assert plan.full


def test_pair_cap() -> None:
    plan = plan_batch([view(0, [10] * 20)], 0.0, LIMITS)
    assert plan.pairs == LIMITS.max_batch_pairs
    assert plan.full


def test_oversized_pair_runs_alone() -> None:
    plan = plan_batch([view(0, [5000, 10])], 0.0, LIMITS)
    assert plan.take == {0: [0]}
    assert plan.full


def test_partial_batch_waits_at_most_max_wait() -> None:
    plan = plan_batch([view(0, [10, 10], admitted_at=1.0)], 1.001, LIMITS)
    assert not plan.full
    assert dispatch_delay(plan, 1.001, LIMITS.max_wait_s) == pytest.approx(0.004, abs=1e-9)
    assert dispatch_delay(plan, 1.005, LIMITS.max_wait_s) == 0.0
    assert dispatch_delay(plan, 2.0, LIMITS.max_wait_s) == 0.0


def test_full_batch_goes_now() -> None:
    plan = plan_batch([view(0, [100] * 10, admitted_at=1.0)], 1.0, LIMITS)
    assert plan.full
    assert dispatch_delay(plan, 1.0, LIMITS.max_wait_s) == 0.0


def test_zero_wait_sends_at_once() -> None:
    plan = plan_batch([view(0, [10], admitted_at=1.0)], 1.0, LIMITS)
    assert dispatch_delay(plan, 1.0, 0.0) == 0.0


def test_short_request_overtakes_long_one() -> None:
    big = view(0, [30] * 1000, admitted_at=0.0)
    small = view(1, [40] * 3, admitted_at=0.1)
    plan = plan_batch([big, small], 0.1, LIMITS)
    # The small request is the head: all of it goes in this batch, the big one fills the rest.
    assert plan.take[1] == [0, 1, 2]
    assert len(plan.take[0]) == LIMITS.max_batch_pairs - 3


def test_fillers_never_raise_the_padded_length() -> None:
    head = view(0, [100, 100], admitted_at=0.0)
    other = view(1, [400, 300, 90, 80, 20], admitted_at=0.0)
    plan = plan_batch([head, other], 0.0, LIMITS)
    assert plan.take[0] == [0, 1]
    # 400 and 300 would raise the padding; the longest pairs that fit under 100 come first.
    assert plan.take[1] == [2, 3, 4]
    assert plan.padded_length == 100


def test_aging_stops_starvation() -> None:
    old_big = view(0, [10] * 100, admitted_at=0.0)
    new_small = view(1, [10] * 10, admitted_at=100.0)
    assert rank_key(new_small, 100.0, 2.0) > rank_key(old_big, 100.0, 2.0)
    plan = plan_batch([new_small, old_big], 100.0, LIMITS)
    assert 0 in plan.take and plan.take[0] == list(range(8))


def test_ties_go_to_the_earlier_request() -> None:
    a = view(0, [10] * 4, admitted_at=0.0)
    b = view(1, [10] * 4, admitted_at=0.0)
    limits = BatchLimits(max_batch_tokens=1000, max_batch_pairs=4, max_wait_s=0.0, aging_s=2.0)
    assert list(plan_batch([b, a], 0.0, limits).take) == [0]


def test_unsorted_serving_order_keeps_arrival_order() -> None:
    plan = plan_batch([view(0, [10, 300, 20], sort=False)], 0.0, LIMITS)
    assert plan.take == {0: [0, 1, 2]}
    assert plan.padded_length == 300


def test_unsorted_fillers_skip_pairs_that_do_not_fit() -> None:
    limits = BatchLimits(max_batch_tokens=600, max_batch_pairs=8, max_wait_s=0.0, aging_s=2.0)
    head = view(0, [100], sort=False)
    other = view(1, [100, 500, 100, 100, 100], admitted_at=1.0, sort=False)
    plan = plan_batch([head, other], 1.0, limits)
    assert plan.take[1] == [0, 2, 3, 4]
    assert plan.padded_length * plan.pairs == 500


def test_interactive_work_goes_before_batch_work_whatever_its_size() -> None:
    small_batch = RequestView(0, 0.0, [0, 1], [10, 10], sorted_desc=True, batch=True)
    big_interactive = view(1, [10] * 100, admitted_at=0.5)
    plan = plan_batch([small_batch, big_interactive], 1.0, LIMITS)
    # Shortest-remaining-first alone would take the 2 batch pairs first; the class comes first.
    assert plan.take == {1: list(range(8))}
    # Alone, batch work fills the idle engine.
    assert plan_batch([small_batch], 1.0, LIMITS).take == {0: [0, 1]}


def test_batch_work_waits_no_longer_than_its_aging_bound() -> None:
    limits = BatchLimits(1000, 8, 0.005, aging_s=2.0, batch_aging_s=30.0)
    old_batch = RequestView(0, 0.0, [0, 1], [10, 10], sorted_desc=True, batch=True)
    interactive = view(1, [10] * 100, admitted_at=29.0)
    assert 0 not in plan_batch([old_batch, interactive], 29.9, limits).take
    # Past the bound it gets the next batch once it is its turn (an interactive request was
    # wholly dispatched since its last batch).
    assert 0 not in plan_batch([old_batch, interactive], 30.0, limits).take
    assert plan_batch([old_batch, interactive], 30.0, limits, batch_turn=True).take == {0: [0, 1]}


def test_a_key_flooding_the_queue_is_served_after_a_key_sending_little() -> None:
    def keyed(key: int, tenant: str, pairs: int, at: float) -> RequestView:
        return RequestView(key, at, list(range(pairs)), [10] * pairs, True, tenant=tenant)

    # key0 has queued 4 requests (50, 49, 48 and 47 pairs); key1 one of 60.
    flood = [keyed(k, "key0", 50 - k, 0.0) for k in range(4)]
    light = keyed(9, "key1", 60, 0.5)
    plan = plan_batch([*flood, light], 1.0, LIMITS)
    # By request alone key0's 47-pair request ranks first; by key, key1's 60 queued pairs are
    # fewer than key0's 194.
    assert rank_key(flood[3], 1.0, 2.0) < rank_key(light, 1.0, 2.0)
    assert list(plan.take) == [9]
    # Without keys (one tenant) the request ranks decide, as before.
    untagged = [RequestView(r.key, r.admitted_at, r.pending, r.lengths, True) for r in flood]
    assert list(plan_batch([*untagged, view(9, [10] * 60, 0.5)], 1.0, LIMITS).take) == [3]


def test_aged_batch_work_gets_a_batch_per_interactive_request() -> None:
    limits = BatchLimits(1000, 8, 0.005, aging_s=2.0, batch_aging_s=30.0)
    aged = RequestView(0, 0.0, list(range(20)), [10] * 20, sorted_desc=True, batch=True)
    interactive = view(1, [10] * 100, admitted_at=40.0)
    assert list(plan_batch([aged, interactive], 40.0, limits, batch_turn=True).take) == [0]
    assert list(plan_batch([aged, interactive], 40.0, limits, batch_turn=False).take) == [1]
    # Not yet aged: interactive work only, whoever's turn it is.
    young = RequestView(0, 20.0, list(range(20)), [10] * 20, sorted_desc=True, batch=True)
    assert list(plan_batch([young, interactive], 40.0, limits, batch_turn=True).take) == [1]
