"""The engine's price of a pair by length, and the queue's backlog priced with it."""

from __future__ import annotations

import pytest

from crossrank.core.admission import Priority
from crossrank.core.cost import Backlog, PairCost, bucket


def test_a_pair_is_priced_by_its_length_bucket() -> None:
    assert [bucket(n) for n in (1, 16, 17, 100, 512)] == [16, 16, 32, 128, 512]
    cost = PairCost()
    assert cost.seconds(40) is None and cost.prefix_within([40, 40], 0.0) == 2
    cost.observe(padded_length=60, pairs=16, seconds=0.16)  # 10 ms a pair of 33-64 tokens
    cost.observe(padded_length=500, pairs=2, seconds=0.2)  # 100 ms a pair of 257-512
    assert cost.seconds(40) == pytest.approx(0.01)
    assert cost.seconds(300) == pytest.approx(0.1)
    # An unmeasured bucket: its nearest measured one, scaled by length.
    assert cost.seconds(100) == pytest.approx(0.02)
    # Smoothed: one batch twice as slow moves the price a fifth of the way.
    cost.observe(padded_length=64, pairs=16, seconds=0.32)
    assert cost.seconds(40) == pytest.approx(0.012)
    # In order: what 0.13 s pays for (0.012 + 0.1, then another 0.1 is too much).
    assert cost.prefix_within([40, 300, 300], 0.13) == 2


def test_the_backlog_prices_the_work_ahead_of_each_class() -> None:
    cost = PairCost()
    backlog = Backlog(cost)
    backlog.add(1, Priority.INTERACTIVE, 100.0, [40] * 10)
    backlog.add(2, Priority.BATCH, 100.0, [40] * 30)
    backlog.add(3, Priority.INTERACTIVE, 100.0, [])  # nothing queued: nothing counted
    assert backlog.wait_seconds(Priority.INTERACTIVE, 0.0) is None  # nothing measured yet
    cost.observe(padded_length=64, pairs=1, seconds=0.01)
    # Interactive work waits for interactive work only; batch work for both.
    assert backlog.wait_seconds(Priority.INTERACTIVE, 0.0) == pytest.approx(0.1)
    assert backlog.wait_seconds(Priority.BATCH, 0.0) == pytest.approx(0.4)
    # A request ahead counts for no longer than it has left before its deadline.
    backlog.add(4, Priority.INTERACTIVE, 0.05, [40] * 50)
    assert backlog.wait_seconds(Priority.INTERACTIVE, 0.0) == pytest.approx(0.15)
    assert backlog.wait_seconds(Priority.INTERACTIVE, 1.0) == pytest.approx(0.1)
    # And the whole queue ahead for no longer than its latest deadline.
    assert backlog.wait_seconds(Priority.INTERACTIVE, 99.95) == pytest.approx(0.05)
    backlog.discard(4)
    backlog.remove(1, [40] * 10)
    backlog.remove(2, [40] * 20)
    assert backlog.wait_seconds(Priority.INTERACTIVE, 0.0) == 0.0
    assert backlog.wait_seconds(Priority.BATCH, 0.0) == pytest.approx(0.1)
