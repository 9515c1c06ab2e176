"""The watchdog: its bounds as pure functions, and a hung engine over real HTTP."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support import RunningServer, metric, run_server, wait_for

from crossrank.core.watchdog import WatchdogLimits, expected_seconds, stall_deadline, updated_speed
from crossrank.model.model_dir import ModelDir

LIMITS = WatchdogLimits(multiple=10.0, floor_s=2.0)
BODY = {"query": "the capital of france", "passages": ["paris", "a cat", "blue sky"]}


def post(srv: RunningServer, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with srv.client() as c:
        response = c.post("/rerank", json=body)
    return response, time.monotonic() - started


def test_a_batch_stalls_at_a_multiple_of_its_expected_time_never_under_the_floor() -> None:
    assert stall_deadline(100.0, 0.5, LIMITS) == 105.0
    assert stall_deadline(100.0, 0.01, LIMITS) == 102.0
    assert stall_deadline(100.0, 0.0, LIMITS) == 102.0


def test_expected_time_scales_with_the_batch_and_the_measured_speed() -> None:
    assert expected_seconds(None, 4096) == 0.0
    assert expected_seconds(1e-4, 2000) == pytest.approx(0.2)
    speed = updated_speed(None, 1.0, 1000)
    assert speed == pytest.approx(1e-3)
    # One batch 10x slower moves the estimate a fifth of the way.
    assert updated_speed(speed, 10.0, 1000) == pytest.approx(0.8e-3 + 0.2 * 1e-2)


def test_a_hung_engine_turns_ready_then_health_to_503_and_recovers(model_dir: ModelDir) -> None:
    with run_server(
        model_dir, gated=True, max_batch_pairs=2, watchdog_floor_s=0.5, watchdog_liveness_s=2.0
    ) as srv:
        srv.wait_ready()
        engine = srv.engine
        assert engine is not None
        while engine.entered.acquire(blocking=False):
            pass  # the warm-up's batches
        engine.gate.clear()  # the engine hangs from the next batch on
        with ThreadPoolExecutor(2) as pool:
            hung = pool.submit(post, srv, BODY)
            assert engine.entered.acquire(timeout=10)  # its batch is in the engine
            queued = pool.submit(post, srv, {**BODY, "query": "another"})
            answers = [hung.result(), queued.result()]
        for response, seconds in answers:
            assert response.status_code == 503
            assert response.json()["error"]["type"] == "engine_stalled"
            assert "Retry-After" in response.headers
            assert seconds < 5  # at the watchdog's bound, not at the 60 s deadline
        with srv.client() as c:
            ready = c.get("/ready")
            refused = c.post("/rerank", json=BODY)
            alive = c.get("/health")
        assert ready.status_code == 503
        assert ready.json()["reason"] == "engine stalled"
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "engine_stalled"
        assert alive.status_code == 200  # not yet past watchdog_liveness_s
        with srv.client() as c:
            wait_for(lambda: c.get("/health").status_code == 503)
            stuck = c.get("/health")
        assert stuck.json()["status"] == "stuck"
        assert metric(srv, "crossrank_engine_stalls_total") == 1
        assert metric(srv, "crossrank_engine_healthy") == 0
        engine.gate.set()  # the batch comes back
        srv.wait_ready()
        with srv.client() as c:
            assert c.get("/health").status_code == 200
            assert c.post("/rerank", json=BODY).status_code == 200
