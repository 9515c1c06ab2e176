"""The queue and its worker against a scripted engine: no model, deterministic."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from crossrank.core.admission import Admission, Priority
from crossrank.core.errors import ErrorType, ServiceError
from crossrank.core.queue import PairQueue
from crossrank.core.scheduling import BatchLimits
from crossrank.core.watchdog import WatchdogLimits
from crossrank.core.worker import Worker
from crossrank.model.collate import PaddedBatch, pad_pairs
from crossrank.model.tokenization import EncodedPair
from crossrank.ops.metrics import Metrics

POISON = 666


class ScriptedEngine:
    """Logit of a pair = a function of its own tokens only, so batching cannot change it."""

    provider = "test"
    uses_token_type_ids = True

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.batches: list[PaddedBatch] = []
        self.broken = False

    def run(self, batch: PaddedBatch) -> np.ndarray:
        self.entered.release()
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


@dataclass
class Parts:
    engine: ScriptedEngine
    metrics: Metrics
    worker: Worker
    queue: PairQueue
    admission: Admission

    async def score(self, pairs: list[EncodedPair], timeout_s: float = 5.0) -> np.ndarray:
        """What the pipeline does: a permit for the pairs, held until they are scored."""
        async with self.admission.acquire(len(pairs)) as permit:
            return await self.queue.wait(self.queue.submit(permit, pairs, timeout_s))

    def start(self, pairs: list[EncodedPair], timeout_s: float = 5.0) -> asyncio.Task:
        return asyncio.ensure_future(self.score(pairs, timeout_s))

    async def held(self, pairs: list[EncodedPair], timeout_s: float = 5.0) -> asyncio.Task:
        """A request whose first batch the engine holds at its (closed) gate."""
        self.engine.gate.clear()
        task = self.start(pairs, timeout_s)
        await self.engine_entered()
        return task

    async def engine_entered(self, batches: int = 1) -> None:
        """Until the engine has been handed ``batches`` more batches (it may be holding them
        at its gate)."""
        for _ in range(batches):
            await asyncio.to_thread(self.engine.entered.acquire, True, 10)

    async def queued(self, pairs: int) -> None:
        """Until the queue task has taken in requests holding ``pairs`` undispatched pairs."""
        for _ in range(10_000):
            if self.sample("crossrank_queue_depth_pairs") == pairs:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"the queue never held {pairs} pairs")

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {**labels, "model": "m"})
        return 0.0 if value is None else value


@asynccontextmanager
async def running(**kw) -> AsyncIterator[Parts]:
    engine = ScriptedEngine()
    metrics = Metrics()
    model = metrics.for_model("m")
    worker = Worker(
        engine,
        model,
        probe=pad_pairs([pair(4)]),
        watchdog=WatchdogLimits(
            multiple=kw.pop("watchdog_multiple", 20.0),
            floor_s=kw.pop("watchdog_floor_s", 60.0),
        ),
    )
    limits = BatchLimits(
        max_batch_tokens=kw.pop("max_batch_tokens", 400),
        max_batch_pairs=kw.pop("max_batch_pairs", 16),
        max_wait_s=kw.pop("max_wait_s", 0.0),
        aging_s=2.0,
        batch_aging_s=kw.pop("batch_aging_s", float("inf")),
    )
    queue = PairQueue(worker, limits, length_sorting=kw.pop("length_sorting", True), metrics=model)
    worker.on_stall = queue.stall
    admission = Admission(kw.pop("max_queued_pairs", 5000), model, lambda: worker.stalled)
    assert not kw, kw
    queue.start()
    try:
        yield Parts(engine, metrics, worker, queue, admission)
    finally:
        engine.gate.set()
        await queue.close()
        worker.close()


def test_every_pair_scored_and_returned_by_position() -> None:
    async def main() -> None:
        async with running() as parts:
            pairs = [pair(n, token=n) for n in (5, 40, 12, 33, 3, 90, 17)]
            logits = await parts.score(pairs)
            assert logits.tolist() == pytest.approx([expected(p) for p in pairs])

    asyncio.run(main())


def test_batches_respect_the_padded_token_budget_and_sort_by_length() -> None:
    async def main() -> None:
        async with running(max_batch_tokens=400, max_batch_pairs=16) as parts:
            rng = np.random.default_rng(0)
            lengths = rng.integers(5, 120, size=200).tolist()
            await parts.score([pair(n) for n in lengths])
            batches = parts.engine.batches
            assert sum(b.pairs for b in batches) == 200
            for b in batches:
                assert b.padded_tokens <= 400 and b.pairs <= 16
            real = sum(b.real_tokens for b in batches)
            padded = sum(b.padded_tokens for b in batches)
            assert real == sum(lengths)
            # Longest-first batching leaves little padding on a spread of lengths.
            assert real / padded > 0.9
            assert parts.sample("crossrank_tokens_total") == real
            assert parts.sample("crossrank_pairs_total") == 200
            assert parts.sample("crossrank_batch_padded_tokens_sum") == padded
            assert parts.sample("crossrank_batch_pairs_count") == len(batches)

    asyncio.run(main())


def test_length_sorting_off_keeps_arrival_order() -> None:
    async def main() -> None:
        async with running(
            length_sorting=False, max_batch_pairs=2, max_batch_tokens=10_000
        ) as parts:
            await parts.score([pair(n, token=n) for n in (3, 50, 4, 60)])
            firsts = [int(b.input_ids[0, 0]) for b in parts.engine.batches]
            assert firsts == [3, 4]

    asyncio.run(main())


def test_small_request_is_not_stuck_behind_a_large_one() -> None:
    async def main() -> None:
        async with running(max_batch_tokens=400, max_batch_pairs=8) as parts:
            parts.engine.gate.clear()
            big = parts.start([pair(40, token=1) for _ in range(1000)], 30.0)
            await parts.engine_entered()  # the first big batch runs; the next is prepared
            small = parts.start([pair(40, token=2) for _ in range(10)], 30.0)
            await asyncio.sleep(0)  # the small request reaches the queue's inbox
            parts.engine.gate.set()
            await small
            await big
            holds_small = [bool((b.input_ids[:, 0] == 2).any()) for b in parts.engine.batches]
            batches_until_small = max(i for i, small in enumerate(holds_small) if small) + 1
            # The running batch, then the small request's own 10 pairs (2 batches of 8): it is
            # served after 3 batches, not after the big request's 125.
            assert batches_until_small == 3
            assert len(parts.engine.batches) == 1010 // 8 + 1

    asyncio.run(main())


def test_a_dispatched_batch_keeps_its_room_until_the_engine_gives_it_back() -> None:
    async def main() -> None:
        async with running(max_queued_pairs=50, max_batch_pairs=10) as parts:
            waiter = await parts.held([pair(10) for _ in range(40)])
            assert parts.sample("crossrank_queue_depth_pairs") == 30
            assert parts.admission.reserved == 40
            with pytest.raises(ServiceError) as refused:
                parts.admission.acquire(11)
            assert refused.value.type is ErrorType.QUEUE_FULL
            parts.engine.gate.set()
            await waiter
            assert parts.admission.reserved == 0
            assert parts.sample("crossrank_reserved_pairs") == 0
            assert sum(b.pairs for b in parts.engine.batches) == 40

    asyncio.run(main())


def test_the_worker_knows_how_long_its_pairs_take() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=4) as parts:
            assert parts.worker.drain_seconds(100) is None  # nothing scored yet
            await parts.score([pair(10) for _ in range(12)])
            one = parts.worker.drain_seconds(1)
            assert one is not None and one > 0
            assert parts.worker.drain_seconds(100) == pytest.approx(100 * one)

    asyncio.run(main())


def test_room_is_given_back_pair_by_pair_as_batches_finish() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=4) as parts:
            seen: list[int] = []
            inner = parts.engine.run

            def watching(batch: PaddedBatch) -> np.ndarray:
                seen.append(parts.admission.reserved)
                return inner(batch)

            parts.engine.run = watching  # type: ignore[method-assign]
            await parts.score([pair(10) for _ in range(12)])
            assert seen == [12, 8, 4]
            assert parts.admission.reserved == 0

    asyncio.run(main())


def test_room_returns_to_zero_after_failure_deadline_and_cancel() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=4) as parts:
            # Failure: the batch and the pairs dropped with it.
            with pytest.raises(ServiceError):
                await parts.score([pair(10, token=POISON) for _ in range(6)])
            assert parts.admission.reserved == 0
            # Deadline and cancel, with a batch held in the engine meanwhile.
            parts.engine.gate.clear()
            with pytest.raises(ServiceError):
                await parts.score([pair(10) for _ in range(9)], 0.05)
            cancelled = parts.start([pair(9)] * 5)
            await asyncio.sleep(0)  # it reaches the queue's inbox
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            await asyncio.sleep(0)  # the queue's task takes the drop
            assert parts.admission.reserved == 4  # the batch still in the engine
            parts.engine.gate.set()
            async with asyncio.timeout(5):
                await parts.admission.wait_empty()
            # Nothing queued is left in the priced backlog either.
            assert parts.queue.backlog.wait_seconds(Priority.BATCH, 0.0) == 0.0

    asyncio.run(main())


def test_a_request_is_queued_only_on_a_permit_of_its_size() -> None:
    async def main() -> None:
        async with running() as parts, parts.admission.acquire(2) as permit:
            with pytest.raises(ValueError):
                parts.queue.submit(permit, [pair(4)], 5.0)

    asyncio.run(main())


def test_deadline_drops_queued_pairs_before_inference() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=4) as parts:
            parts.engine.gate.clear()
            with pytest.raises(ServiceError) as late:
                await parts.score([pair(10, token=3) for _ in range(20)], 0.05)
            assert late.value.type is ErrorType.DEADLINE_EXCEEDED
            parts.engine.gate.set()
            await parts.score([pair(10, token=4)])
            scored = sum(int((b.input_ids[:, 0] == 3).sum()) for b in parts.engine.batches)
            dropped = parts.sample("crossrank_dropped_pairs_total", reason="deadline")
            # At most the batch already in the engine (and none prepared after it) was scored.
            assert scored <= 4
            assert dropped == 20 - scored
            assert parts.sample("crossrank_queue_depth_pairs") == 0

    asyncio.run(main())


def test_cancelled_waiter_drops_its_pairs() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=4) as parts:
            waiter = await parts.held([pair(10) for _ in range(12)])
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            parts.engine.gate.set()
            async with asyncio.timeout(5):
                await parts.admission.wait_empty()
            assert parts.sample("crossrank_dropped_pairs_total", reason="disconnected") == 8
            assert sum(b.pairs for b in parts.engine.batches) == 4

    asyncio.run(main())


def test_engine_fault_fails_only_that_batch() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=4, max_batch_tokens=10_000) as parts:
            good = await parts.held([pair(10, token=1) for _ in range(4)])
            bad = parts.start([pair(10, token=POISON) for _ in range(6)])
            await asyncio.sleep(0)  # it reaches the queue's inbox
            parts.engine.gate.set()
            assert len(await good) == 4
            with pytest.raises(ServiceError) as failed:
                await bad
            assert failed.value.type is ErrorType.ENGINE_FAILURE
            assert "error id" in failed.value.message
            # The engine still works (the probe passed), and the queue still serves.
            assert parts.worker.healthy
            after = await parts.score([pair(8, token=2)])
            assert after.tolist() == pytest.approx([expected(pair(8, token=2))])
            assert parts.sample("crossrank_engine_failures_total") == 1
            assert parts.sample("crossrank_dropped_pairs_total", reason="failed") == 2

    asyncio.run(main())


def test_broken_engine_is_reported_unhealthy_then_recovers() -> None:
    async def main() -> None:
        async with running() as parts:
            parts.engine.broken = True
            with pytest.raises(ServiceError):
                await parts.score([pair(5)])
            assert not parts.worker.healthy
            assert parts.sample("crossrank_engine_healthy") == 0
            parts.engine.broken = False
            await parts.score([pair(5)])
            assert parts.worker.healthy

    asyncio.run(main())


def test_drain_refuses_new_work_and_finishes_admitted() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=2) as parts:
            waiter = await parts.held([pair(5) for _ in range(6)])
            parts.admission.drain()
            emptied = asyncio.ensure_future(parts.admission.wait_empty())
            with pytest.raises(ServiceError) as refused:
                parts.admission.acquire(1)
            assert refused.value.type is ErrorType.SHUTTING_DOWN
            for _ in range(100):  # turns for the waiter: it must still wait on the engine
                await asyncio.sleep(0)
            assert not emptied.done()
            parts.engine.gate.set()
            assert len(await waiter) == 6
            await emptied

    asyncio.run(main())


def test_a_request_knows_the_batches_its_pairs_went_in_and_their_padding() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=2) as parts:
            permit = parts.admission.acquire(5)
            pairs = [pair(n) for n in (5, 3, 5, 4, 2)]
            ticket = parts.queue.submit(permit, pairs, 5.0)
            await parts.queue.wait(ticket)
            queued = ticket.queued(time.monotonic())
            # Longest first, two a batch: (5, 5), (4, 3), (2) -> 2 x 5 + 2 x 4 + 1 x 2 padded.
            assert (queued.batches, queued.padded_tokens) == (3, 20)
            assert queued.queue_s >= 0 and queued.inference_s > 0

    asyncio.run(main())


def test_max_wait_merges_requests_arriving_close_together() -> None:
    async def main() -> None:
        async with running(max_wait_s=0.2, max_batch_pairs=16, max_batch_tokens=10_000) as parts:
            a = parts.start([pair(5, token=1) for _ in range(3)])
            await parts.queued(3)  # a waits for the batch to fill
            b = parts.start([pair(5, token=2) for _ in range(3)])
            await asyncio.gather(a, b)
            assert [x.pairs for x in parts.engine.batches] == [6]

    asyncio.run(main())


def test_a_batching_bug_fails_the_queued_requests_instead_of_hanging_them() -> None:
    async def main() -> None:
        async with running() as parts:
            original = parts.queue._prepare
            calls = {"n": 0}

            def flaky(now: float):
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("planner bug")
                return original(now)

            parts.queue._prepare = flaky  # type: ignore[method-assign]
            with pytest.raises(ServiceError) as failed:
                await parts.score([pair(5)])
            assert failed.value.type is ErrorType.INTERNAL
            # The loop survived: the next request is served.
            assert len(await parts.score([pair(5)])) == 1

    asyncio.run(main())


def test_a_hung_batch_stalls_the_engine_and_fails_the_queue_at_once() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=2, watchdog_floor_s=0.2) as parts:
            await parts.score([pair(5)])  # measures the engine's speed
            parts.engine.entered.acquire()
            parts.engine.gate.clear()  # the engine hangs
            started_at = asyncio.get_running_loop().time()
            hung = parts.start([pair(5)] * 4, 30.0)
            await parts.engine_entered()
            queued = parts.start([pair(6)], 30.0)
            for waiter in (hung, queued):
                with pytest.raises(ServiceError) as failed:
                    await waiter
                assert failed.value.type is ErrorType.ENGINE_STALLED
            # At the watchdog's bound, not at the requests' 30 s deadline.
            assert asyncio.get_running_loop().time() - started_at < 5.0
            assert parts.worker.stalled
            assert parts.worker.stuck_for(parts.worker._clock()) >= 0.2
            with pytest.raises(ServiceError) as refused:
                parts.admission.acquire(1)
            assert refused.value.type is ErrorType.ENGINE_STALLED
            assert parts.sample("crossrank_engine_stalls_total") == 1
            assert parts.sample("crossrank_dropped_pairs_total", reason="stalled") == 3
            assert parts.admission.reserved == 2  # the hung batch's pairs, still in the engine
            parts.engine.gate.set()  # it comes back: the engine serves again
            async with asyncio.timeout(5):
                await parts.admission.wait_empty()
            assert not parts.worker.stalled
            assert parts.worker.stuck_for(parts.worker._clock()) == 0
            assert len(await parts.score([pair(5)])) == 1

    asyncio.run(main())


def test_workers_taking_turns_never_run_two_batches_at_once() -> None:
    async def main() -> None:
        running, most = 0, 0
        guard = threading.Lock()

        class Counting(ScriptedEngine):
            def run(self, batch: PaddedBatch) -> np.ndarray:
                nonlocal running, most
                with guard:
                    running += 1
                    most = max(most, running)
                try:
                    time.sleep(0.005)  # long enough for the other worker to try its batch
                    return super().run(batch)
                finally:
                    with guard:
                        running -= 1

        for turns, expected_most in ((asyncio.Lock(), 1), (None, 2)):
            running, most = 0, 0
            workers = [
                Worker(
                    Counting(),
                    Metrics().for_model(name),
                    probe=pad_pairs([pair(4)]),
                    watchdog=WatchdogLimits(multiple=20.0, floor_s=60.0),
                    turns=turns,
                )
                for name in ("a", "b")
            ]
            batches = [pad_pairs([pair(8)]) for _ in range(20)]
            await asyncio.gather(*(w.run(b) for b in batches for w in workers))
            assert most == expected_most
            for worker in workers:
                worker.close()

    asyncio.run(main())


def test_aged_batch_work_takes_one_batch_after_each_interactive_request() -> None:
    async def main() -> None:
        async with running(max_batch_pairs=4, batch_aging_s=0.001) as parts:
            parts.engine.gate.clear()
            # Batch work (token 1) aged at once; the engine holds its first batch.
            batch_permit = parts.admission.acquire(12, Priority.BATCH)
            batch = parts.queue.submit(batch_permit, [pair(10, token=1) for _ in range(12)], 30.0)
            await parts.engine_entered()
            # Two interactive requests of 8 pairs (tokens 2 and 3) queue behind it.
            first = parts.start([pair(10, token=2) for _ in range(8)], 30.0)
            second = parts.start([pair(10, token=3) for _ in range(8)], 30.0)
            await parts.queued(8 + 16)  # the batch work's rest and both interactive requests
            parts.engine.gate.set()
            await first
            await second
            await parts.queue.wait(batch)
            tokens = [int(b.input_ids[0, 0]) for b in parts.engine.batches]
            # The held batch work, then each interactive request whole, then one batch of the
            # aged batch work after each, until it is done.
            assert tokens == [1, 2, 2, 1, 3, 3, 1]

    asyncio.run(main())
