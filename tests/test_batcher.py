"""The dynamic batcher against a scripted engine: no model, deterministic."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from crossrank.batcher import Batcher, Ticket
from crossrank.collate import PaddedBatch
from crossrank.errors import ErrorType, ServiceError
from crossrank.metrics import Metrics
from crossrank.scheduling import BatchLimits
from crossrank.tokenization import EncodedPair
from crossrank.watchdog import WatchdogLimits

POISON = 666


class ScriptedEngine:
    """Logit of a pair = a function of its own tokens only, so batching cannot change it."""

    provider = "test"
    uses_token_type_ids = True

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[PaddedBatch] = []
        self.broken = False

    def run(self, batch: PaddedBatch) -> np.ndarray:
        assert self.gate.wait(10)
        if self.broken or (batch.input_ids == POISON).any():
            raise RuntimeError("scripted fault")
        self.batches.append(batch)
        ids = batch.input_ids * batch.attention_mask
        return (ids.sum(axis=1) / 1000.0 + batch.attention_mask.sum(axis=1)).astype(np.float32)


def pair(length: int, token: int = 7) -> EncodedPair:
    ids = np.full(length, token, dtype=np.int64)
    return EncodedPair(ids, np.zeros(length, dtype=np.int64))


def expected(p: EncodedPair) -> float:
    return float(p.input_ids.sum() / 1000.0 + p.length)


def make(engine: ScriptedEngine, metrics: Metrics | None = None, **kw) -> Batcher:
    limits = BatchLimits(
        max_batch_tokens=kw.pop("max_batch_tokens", 400),
        max_batch_pairs=kw.pop("max_batch_pairs", 16),
        max_wait_s=kw.pop("max_wait_s", 0.0),
        aging_s=2.0,
    )
    return Batcher(
        engine,
        limits,
        max_queued_pairs=kw.pop("max_queued_pairs", 5000),
        length_sorting=kw.pop("length_sorting", True),
        metrics=metrics or Metrics(),
        probe=[pair(4)],
        watchdog=WatchdogLimits(
            multiple=kw.pop("watchdog_multiple", 20.0),
            floor_s=kw.pop("watchdog_floor_s", 60.0),
            liveness_s=kw.pop("watchdog_liveness_s", 120.0),
        ),
    )


def admit(batcher: Batcher, pairs: list[EncodedPair], timeout_s: float) -> Ticket:
    """Reserve, then queue: what the reranker does around tokenisation."""
    return batcher.admit(batcher.reserve(len(pairs)), pairs, timeout_s)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def started(engine: ScriptedEngine) -> None:
    """Wait until the engine's worker thread exists and has had time to block on the gate."""
    while not any(t.name.startswith("crossrank-engine") for t in threading.enumerate()):
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.02)


def test_every_pair_scored_and_returned_by_position() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        batcher = make(engine)
        batcher.start()
        pairs = [pair(n, token=n) for n in (5, 40, 12, 33, 3, 90, 17)]
        logits = await batcher.wait(admit(batcher, pairs, 5.0))
        assert logits.tolist() == pytest.approx([expected(p) for p in pairs])
        await batcher.close()

    asyncio.run(main())


def test_batches_respect_the_padded_token_budget_and_sort_by_length() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        metrics = Metrics()
        batcher = make(engine, metrics, max_batch_tokens=400, max_batch_pairs=16)
        batcher.start()
        rng = np.random.default_rng(0)
        lengths = rng.integers(5, 120, size=200).tolist()
        await batcher.wait(admit(batcher, [pair(n) for n in lengths], 5.0))
        await batcher.close()
        assert sum(b.pairs for b in engine.batches) == 200
        for b in engine.batches:
            assert b.padded_tokens <= 400 and b.pairs <= 16
        real = sum(b.real_tokens for b in engine.batches)
        padded = sum(b.padded_tokens for b in engine.batches)
        assert real == sum(lengths)
        # Longest-first batching leaves little padding on a spread of lengths.
        assert real / padded > 0.9
        assert sample(metrics, "crossrank_tokens_total") == real
        assert sample(metrics, "crossrank_pairs_total") == 200
        assert sample(metrics, "crossrank_batch_padded_tokens_sum") == padded
        assert sample(metrics, "crossrank_batch_pairs_count") == len(engine.batches)

    asyncio.run(main())


def test_length_sorting_off_keeps_arrival_order() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        batcher = make(engine, length_sorting=False, max_batch_pairs=2, max_batch_tokens=10_000)
        batcher.start()
        await batcher.wait(admit(batcher, [pair(n, token=n) for n in (3, 50, 4, 60)], 5.0))
        await batcher.close()
        firsts = [int(b.input_ids[0, 0]) for b in engine.batches]
        assert firsts == [3, 4]

    asyncio.run(main())


def test_small_request_is_not_stuck_behind_a_large_one() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        batcher = make(engine, max_batch_tokens=400, max_batch_pairs=8)
        batcher.start()
        engine.gate.clear()
        big = admit(batcher, [pair(40, token=1) for _ in range(1000)], 30.0)
        big_task = asyncio.ensure_future(batcher.wait(big))
        await started(engine)  # the first big batch is running; the next one is prepared
        small = admit(batcher, [pair(40, token=2) for _ in range(10)], 30.0)
        small_task = asyncio.ensure_future(batcher.wait(small))
        engine.gate.set()
        await small_task
        await big_task
        await batcher.close()
        holds_small = [bool((b.input_ids[:, 0] == 2).any()) for b in engine.batches]
        batches_until_small = max(i for i, small in enumerate(holds_small) if small) + 1
        # The running batch, then the small request's own 10 pairs (2 batches of 8): it is
        # served after 3 batches, not after the big request's 125.
        assert batches_until_small == 3
        assert len(engine.batches) == 1010 // 8 + 1

    asyncio.run(main())


def test_full_queue_refuses_at_reservation_and_holds_room_until_scored() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        metrics = Metrics()
        batcher = make(engine, metrics, max_queued_pairs=50, max_batch_pairs=10)
        batcher.start()
        engine.gate.clear()
        # Room is held from the reservation on, before there are any pairs to queue.
        held = batcher.reserve(40)
        assert batcher.reserved_pairs == 40
        assert batcher.queued_pairs == 0
        with pytest.raises(ServiceError) as refused:
            batcher.reserve(20)
        assert refused.value.type is ErrorType.QUEUE_FULL
        assert batcher.reserved_pairs == 40
        ticket = batcher.admit(held, [pair(10) for _ in range(40)], 5.0)
        waiter = asyncio.ensure_future(batcher.wait(ticket))
        await started(engine)
        # A dispatched batch still holds its room: the engine is busy with it.
        assert batcher.queued_pairs == 30
        assert batcher.reserved_pairs == 40
        with pytest.raises(ServiceError):
            batcher.reserve(11)
        engine.gate.set()
        await waiter
        assert batcher.reserved_pairs == 0
        assert sample(metrics, "crossrank_reserved_pairs") == 0
        await batcher.close()
        assert sum(b.pairs for b in engine.batches) == 40

    asyncio.run(main())


def test_refusal_before_the_count_and_resizing_a_reservation() -> None:
    async def main() -> None:
        batcher = make(ScriptedEngine(), max_queued_pairs=50)
        # Not yet counted (None): refused only when no room at all is left.
        assert batcher.refusal() is None
        held = batcher.reserve(30)
        assert batcher.refusal() is None
        assert batcher.refusal(21) is not None and batcher.refusal(20) is None
        # Grown within the room, refused beyond it (keeping what it held), shrunk at will.
        batcher.resize(held, 45)
        assert (held.pairs, batcher.reserved_pairs) == (45, 45)
        with pytest.raises(ServiceError) as refused:
            batcher.resize(held, 51)
        assert refused.value.type is ErrorType.QUEUE_FULL
        assert (held.pairs, batcher.reserved_pairs) == (45, 45)
        batcher.resize(held, 50)
        full = batcher.refusal()
        assert full is not None and full.type is ErrorType.QUEUE_FULL
        batcher.resize(held, 3)
        assert (held.pairs, batcher.reserved_pairs) == (3, 3)
        batcher.release(held)
        assert batcher.reserved_pairs == 0
        batcher.begin_drain()
        draining = batcher.refusal()
        assert draining is not None and draining.type is ErrorType.SHUTTING_DOWN
        await batcher.close()

    asyncio.run(main())


def test_room_is_given_back_pair_by_pair_as_batches_finish() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        batcher = make(engine, max_batch_pairs=4)
        seen: list[int] = []
        inner = engine.run

        def watching(batch: PaddedBatch) -> np.ndarray:
            seen.append(batcher.reserved_pairs)
            return inner(batch)

        engine.run = watching  # type: ignore[method-assign]
        batcher.start()
        await batcher.wait(admit(batcher, [pair(10) for _ in range(12)], 5.0))
        assert seen == [12, 8, 4]
        assert batcher.reserved_pairs == 0
        await batcher.close()

    asyncio.run(main())


def test_room_returns_to_zero_after_failure_deadline_cancel_and_release() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        batcher = make(engine, max_batch_pairs=4)
        batcher.start()
        # Failure: the batch and the pairs dropped with it.
        with pytest.raises(ServiceError):
            await batcher.wait(admit(batcher, [pair(10, token=POISON) for _ in range(6)], 5.0))
        assert batcher.reserved_pairs == 0
        # Deadline and cancel, with a batch held in the engine meanwhile.
        engine.gate.clear()
        late = admit(batcher, [pair(10) for _ in range(9)], 0.05)
        with pytest.raises(ServiceError):
            await batcher.wait(late)
        cancelled = asyncio.ensure_future(batcher.wait(admit(batcher, [pair(9)] * 5, 5.0)))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert batcher.reserved_pairs == 4  # the batch still in the engine
        engine.gate.set()
        # A reservation that never became a request (e.g. its tokenisation failed).
        batcher.release(batcher.reserve(30))
        await batcher.close()
        assert batcher.reserved_pairs == 0

    asyncio.run(main())


def test_admission_must_match_its_reservation() -> None:
    async def main() -> None:
        batcher = make(ScriptedEngine())
        with pytest.raises(ValueError):
            batcher.admit(batcher.reserve(2), [pair(4)], 5.0)

    asyncio.run(main())


def test_deadline_drops_queued_pairs_before_inference() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        metrics = Metrics()
        batcher = make(engine, metrics, max_batch_pairs=4)
        batcher.start()
        engine.gate.clear()
        ticket = admit(batcher, [pair(10, token=3) for _ in range(20)], 0.05)
        with pytest.raises(ServiceError) as late:
            await batcher.wait(ticket)
        assert late.value.type is ErrorType.DEADLINE_EXCEEDED
        engine.gate.set()
        other = admit(batcher, [pair(10, token=4)], 5.0)
        await batcher.wait(other)
        await batcher.close()
        scored = sum(int((b.input_ids[:, 0] == 3).sum()) for b in engine.batches)
        dropped = sample(metrics, "crossrank_dropped_pairs_total", reason="deadline")
        # At most the batch already in the engine (and none prepared after it) was scored.
        assert scored <= 4
        assert dropped == 20 - scored
        assert sample(metrics, "crossrank_queue_depth_pairs") == 0

    asyncio.run(main())


def test_cancelled_waiter_drops_its_pairs() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        metrics = Metrics()
        batcher = make(engine, metrics, max_batch_pairs=4)
        batcher.start()
        engine.gate.clear()
        ticket = admit(batcher, [pair(10) for _ in range(12)], 5.0)
        waiter = asyncio.ensure_future(batcher.wait(ticket))
        await started(engine)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        engine.gate.set()
        await batcher.close()
        assert sample(metrics, "crossrank_dropped_pairs_total", reason="disconnected") == 8
        assert sum(b.pairs for b in engine.batches) == 4

    asyncio.run(main())


def test_engine_fault_fails_only_that_batch() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        metrics = Metrics()
        batcher = make(engine, metrics, max_batch_pairs=4, max_batch_tokens=10_000)
        batcher.start()
        engine.gate.clear()
        good = admit(batcher, [pair(10, token=1) for _ in range(4)], 5.0)
        good_task = asyncio.ensure_future(batcher.wait(good))
        await started(engine)
        bad = admit(batcher, [pair(10, token=POISON) for _ in range(6)], 5.0)
        bad_task = asyncio.ensure_future(batcher.wait(bad))
        engine.gate.set()
        assert len(await good_task) == 4
        with pytest.raises(ServiceError) as failed:
            await bad_task
        assert failed.value.type is ErrorType.ENGINE_FAILURE
        assert failed.value.error_id
        # The engine still works (the probe passed), and the batcher still serves.
        assert batcher.healthy
        after = await batcher.wait(admit(batcher, [pair(8, token=2)], 5.0))
        assert after.tolist() == pytest.approx([expected(pair(8, token=2))])
        assert sample(metrics, "crossrank_engine_failures_total") == 1
        assert sample(metrics, "crossrank_dropped_pairs_total", reason="failed") == 2
        await batcher.close()

    asyncio.run(main())


def test_broken_engine_is_reported_unhealthy_then_recovers() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        metrics = Metrics()
        batcher = make(engine, metrics)
        batcher.start()
        engine.broken = True
        with pytest.raises(ServiceError):
            await batcher.wait(admit(batcher, [pair(5)], 5.0))
        assert not batcher.healthy
        assert sample(metrics, "crossrank_engine_healthy") == 0
        engine.broken = False
        await batcher.wait(admit(batcher, [pair(5)], 5.0))
        assert batcher.healthy
        await batcher.close()

    asyncio.run(main())


def test_drain_refuses_new_work_and_finishes_admitted() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        batcher = make(engine, max_batch_pairs=2)
        batcher.start()
        engine.gate.clear()
        ticket = admit(batcher, [pair(5) for _ in range(6)], 5.0)
        waiter = asyncio.ensure_future(batcher.wait(ticket))
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceError) as refused:
            admit(batcher, [pair(5)], 5.0)
        assert refused.value.type is ErrorType.SHUTTING_DOWN
        assert not closing.done()
        engine.gate.set()
        assert len(await waiter) == 6
        await closing

    asyncio.run(main())


def test_max_wait_merges_requests_arriving_close_together() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        batcher = make(engine, max_wait_s=0.2, max_batch_pairs=16, max_batch_tokens=10_000)
        batcher.start()
        a = admit(batcher, [pair(5, token=1) for _ in range(3)], 5.0)
        await asyncio.sleep(0.01)
        b = admit(batcher, [pair(5, token=2) for _ in range(3)], 5.0)
        await asyncio.gather(batcher.wait(a), batcher.wait(b))
        await batcher.close()
        assert [x.pairs for x in engine.batches] == [6]

    asyncio.run(main())


def test_a_batching_bug_fails_the_queued_requests_instead_of_hanging_them() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        batcher = make(engine)
        original = batcher._prepare
        calls = {"n": 0}

        def flaky(now: float):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("planner bug")
            return original(now)

        batcher._prepare = flaky  # type: ignore[method-assign]
        batcher.start()
        with pytest.raises(ServiceError) as failed:
            await batcher.wait(admit(batcher, [pair(5)], 5.0))
        assert failed.value.type is ErrorType.INTERNAL
        # The loop survived: the next request is served.
        assert len(await batcher.wait(admit(batcher, [pair(5)], 5.0))) == 1
        await batcher.close()

    asyncio.run(main())


def test_a_hung_batch_stalls_the_engine_and_fails_the_queue_at_once() -> None:
    async def main() -> None:
        engine = ScriptedEngine()
        metrics = Metrics()
        batcher = make(engine, metrics, max_batch_pairs=2, watchdog_floor_s=0.2)
        batcher.start()
        await batcher.wait(admit(batcher, [pair(5)], 5.0))  # measures the engine's speed
        engine.gate.clear()  # the engine hangs
        started_at = asyncio.get_running_loop().time()
        hung = asyncio.ensure_future(batcher.wait(admit(batcher, [pair(5)] * 4, 30.0)))
        await started(engine)
        queued = asyncio.ensure_future(batcher.wait(admit(batcher, [pair(6)], 30.0)))
        for waiter in (hung, queued):
            with pytest.raises(ServiceError) as failed:
                await waiter
            assert failed.value.type is ErrorType.ENGINE_STALLED
        # At the watchdog's bound, not at the requests' 30 s deadline.
        assert asyncio.get_running_loop().time() - started_at < 5.0
        assert batcher.stalled_since is not None
        assert batcher.stuck_for(batcher._clock()) >= 0.2
        with pytest.raises(ServiceError) as refused:
            batcher.reserve(1)
        assert refused.value.type is ErrorType.ENGINE_STALLED
        assert sample(metrics, "crossrank_engine_stalls_total") == 1
        assert sample(metrics, "crossrank_dropped_pairs_total", reason="stalled") == 3
        assert batcher.reserved_pairs == 2  # the hung batch's pairs, still in the engine
        engine.gate.set()  # it comes back: the engine serves again
        while batcher.stalled_since is not None:
            await asyncio.sleep(0.01)
        assert batcher.reserved_pairs == 0
        assert batcher.stuck_for(batcher._clock()) == 0
        assert len(await batcher.wait(admit(batcher, [pair(5)], 5.0))) == 1
        await batcher.close()

    asyncio.run(main())
