"""Admission and its permits: refusals, resizing, and room given back exactly once on every
path, checked over random interleavings."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossrank.core.admission import Admission, Permit, Priority
from crossrank.core.errors import ErrorType, ServiceError
from crossrank.http.errors import ErrorResponder
from crossrank.ops.metrics import Metrics

BOUND = 50


def test_refusal_before_the_count_and_resizing_a_permit() -> None:
    admission = Admission(BOUND, Metrics().for_model("m"))
    # Not yet counted (None): refused only when no room at all is left.
    assert admission.refusal() is None
    held = admission.acquire(30)
    assert admission.refusal() is None
    assert admission.refusal(21) is not None and admission.refusal(20) is None
    # Grown within the room, refused beyond it (keeping what it held), shrunk at will.
    held.resize(45)
    assert (held.pairs, admission.reserved) == (45, 45)
    with pytest.raises(ServiceError) as refused:
        held.resize(51)
    assert refused.value.type is ErrorType.QUEUE_FULL
    assert "would exceed" in refused.value.message
    assert (held.pairs, admission.reserved) == (45, 45)
    held.resize(50)
    full = admission.refusal()
    assert full is not None and full.type is ErrorType.QUEUE_FULL
    held.resize(3)
    assert (held.pairs, admission.reserved) == (3, 3)
    held.release()
    held.release()
    assert admission.reserved == 0
    admission.drain()
    draining = admission.refusal()
    assert draining is not None and draining.type is ErrorType.SHUTTING_DOWN


def test_a_stalled_engine_refuses_even_an_empty_permit() -> None:
    stalled = {"now": False}
    admission = Admission(BOUND, Metrics().for_model("m"), lambda: stalled["now"])
    admission.acquire(0).release()
    stalled["now"] = True
    with pytest.raises(ServiceError) as refused:
        admission.acquire(0)
    assert refused.value.type is ErrorType.ENGINE_STALLED


def test_a_split_moves_room_and_never_exceeds_what_is_held() -> None:
    admission = Admission(BOUND, Metrics().for_model("m"))
    whole = admission.acquire(10)
    part = whole.split(4)
    assert (whole.pairs, part.pairs, admission.reserved) == (6, 4, 10)
    with pytest.raises(ValueError):
        whole.split(7)
    whole.release()
    assert admission.reserved == 4
    part.release()
    assert admission.reserved == 0


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 30)),
        st.tuples(st.just("resize"), st.integers(0, 40), st.integers(0, 40)),
        st.tuples(st.just("split"), st.integers(0, 40), st.integers(0, 30)),
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("cancel"), st.integers(0, 40)),
        st.tuples(st.just("finish"), st.integers(0, 40)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_random_interleavings_leak_nothing_and_release_nothing_twice(ops: list) -> None:
    """Each permit is held by a task in ``async with``, as a request holds it; a task is
    cancelled (a client gone) or finishes; permits are resized, split, released at random.
    After every step the room reserved is what the open permits hold, within the bound; at the
    end it is 0."""

    async def main() -> None:
        metrics = Metrics()
        admission = Admission(BOUND, metrics.for_model("m"))
        permits: list[Permit] = []
        holders: list[tuple[asyncio.Task, asyncio.Event]] = []

        async def hold(permit: Permit, done: asyncio.Event) -> None:
            async with permit:
                await done.wait()

        def start(permit: Permit) -> None:
            permits.append(permit)
            done = asyncio.Event()
            holders.append((asyncio.ensure_future(hold(permit, done)), done))

        for op in ops:
            kind, index = op[0], op[1] % max(1, len(permits))
            if kind == "acquire":
                try:
                    start(admission.acquire(op[1]))
                except ServiceError as refused:
                    assert refused.type is ErrorType.QUEUE_FULL
                    assert admission.reserved + op[1] > BOUND
            elif not permits:
                continue
            elif kind == "resize":
                before = permits[index].pairs
                try:
                    permits[index].resize(op[2])
                except ServiceError:
                    assert permits[index].pairs == before
            elif kind == "split":
                if op[2] <= permits[index].pairs:
                    start(permits[index].split(op[2]))
            elif kind == "release":
                permits[index].release()
            elif kind == "cancel":
                holders[index][0].cancel()
            else:
                holders[index][1].set()
            await asyncio.sleep(0)  # let cancelled and finished holders leave their block
            assert admission.reserved == sum(p.pairs for p in permits)
            assert 0 <= admission.reserved <= BOUND
            reserved = metrics.registry.get_sample_value("crossrank_reserved_pairs", {"model": "m"})
            assert reserved == admission.reserved
        for _, done in holders:
            done.set()
        await asyncio.gather(*(task for task, _ in holders), return_exceptions=True)
        for permit in permits:
            permit.release()  # again: gives nothing back twice
        assert admission.reserved == 0
        async with asyncio.timeout(1):
            await admission.wait_empty()

    asyncio.run(main())


def test_a_full_queue_says_when_to_retry_from_its_drain_time() -> None:
    seconds_per_pair = 0.05
    admission = Admission(BOUND, Metrics().for_model("m"), drain_seconds=lambda p: p * 0.05)
    held = admission.acquire(40)
    # 30 more need 20 of the 40 ahead scored first; with none counted yet, all 40.
    counted = admission.refusal(30)
    assert counted is not None and counted.retry_after_s == pytest.approx(20 * seconds_per_pair)
    held.resize(BOUND)
    full = admission.refusal()
    assert full is not None and full.retry_after_s == pytest.approx(BOUND * seconds_per_pair)
    # More queued, a longer wait.
    assert full.retry_after_s > counted.retry_after_s
    unmeasured = Admission(BOUND, Metrics().for_model("m"))
    unmeasured.acquire(BOUND)
    refused = unmeasured.refusal()
    assert refused is not None and refused.retry_after_s is None


def test_retry_after_is_the_estimate_rounded_up_and_bounded() -> None:
    respond = ErrorResponder(Metrics(), retry_after_s=1, retry_after_max_s=30)
    scope = {"type": "http", "path": "/rerank"}
    for estimate, header in ((None, "1"), (0.2, "1"), (2.3, "3"), (4000.0, "30")):
        error = ServiceError(ErrorType.QUEUE_FULL, "full", retry_after_s=estimate)
        assert respond(error, scope).headers["Retry-After"] == header


def test_batch_work_has_its_own_room_and_waits_behind_interactive_work() -> None:
    metrics = Metrics()
    admission = Admission(
        BOUND, metrics.for_model("m"), drain_seconds=lambda pairs: pairs, max_batch_pairs=20
    )
    interactive = admission.acquire(BOUND)
    batch = admission.acquire(20, Priority.BATCH)
    assert admission.reserved == BOUND + 20
    full = admission.refusal(1, Priority.BATCH)
    assert full is not None and full.type is ErrorType.QUEUE_FULL and "batch" in full.message
    # A batch request waits for the interactive pairs too (a second per pair here).
    assert full.retry_after_s == BOUND + 1
    sample = metrics.registry.get_sample_value
    assert sample("crossrank_batch_reserved_pairs", {"model": "m"}) == 20
    assert sample("crossrank_reserved_pairs", {"model": "m"}) == BOUND
    interactive.release()
    # Interactive room back; batch room still all taken.
    assert admission.refusal(BOUND) is None and admission.refusal(1, Priority.BATCH) is not None
    batch.release()
    assert admission.reserved == 0


def test_a_key_holding_room_gets_at_most_its_fair_share() -> None:
    admission = Admission(100, Metrics().for_model("m"), fair_keys=True)
    # A key that holds nothing is judged against the bound alone: a lone client is not capped.
    first = admission.acquire(60, tenant="key0")
    over = admission.refusal(1, tenant="key0")
    assert over is not None and over.type is ErrorType.KEY_OVER_SHARE  # 60 > 100 // 2
    # Room is always left for another key's request; then each holds at most 100 // 3.
    second = admission.acquire(30, tenant="key1")
    assert admission.refusal(4, tenant="key1") is not None
    assert admission.refusal(3, tenant="key1") is None
    first.resize(20)
    assert admission.refusal(13, tenant="key0") is None
    assert admission.refusal(14, tenant="key0") is not None
    # A split moves room within the key; released, the key holds nothing and is judged afresh.
    part = second.split(10)
    second.release()
    part.release()
    assert admission.refusal(80, tenant="key1") is None
    # Without fair_keys (fewer than two keys) no key is capped.
    open_ = Admission(100, Metrics().for_model("m"))
    open_.acquire(60, tenant="key0")
    assert open_.refusal(40, tenant="key0") is None
