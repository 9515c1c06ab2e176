"""Readiness, backpressure, deadlines, disconnects, faults, metrics and drain, over real HTTP."""

from __future__ import annotations

import gc
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from support import RunningServer, metric, run_server, wait_for

from crossrank.model.model_dir import ModelDir

BODY = {"query": "the capital of france", "passages": ["paris", "a cat", "blue sky"]}

OK_COUNT = 'crossrank_request_duration_seconds_count{endpoint="/rerank",status="200"}'

SERIES = [
    "crossrank_request_duration_seconds_count",
    "crossrank_queue_wait_seconds_count",
    "crossrank_tokenization_seconds_count",
    "crossrank_batch_inference_seconds_count",
    "crossrank_batch_pairs_count",
    "crossrank_batch_padded_tokens_count",
    "crossrank_batch_padding_efficiency_count",
    "crossrank_queue_depth_pairs",
    "crossrank_reserved_pairs",
    "crossrank_inflight_requests",
    "crossrank_pairs_total",
    "crossrank_tokens_total",
    "crossrank_dropped_pairs_total",
    "crossrank_rejected_requests_total",
    "crossrank_engine_failures_total",
    "crossrank_engine_healthy",
    "crossrank_model_info",
]


def test_ready_only_after_warm_up_and_metrics_present_from_start(model_dir: ModelDir) -> None:
    with run_server(model_dir, gated=True, hold_warm_up=True) as srv:
        assert srv.engine is not None
        with srv.client() as c:
            assert c.get("/health").status_code == 200
            not_ready = c.get("/ready")
            early = c.post("/rerank", json=BODY)
            text = c.get("/metrics").text
        assert not_ready.status_code == 503
        assert not_ready.json()["reason"] == "warming up"
        assert early.status_code == 503
        assert early.json()["error"]["type"] == "not_ready"
        assert "Retry-After" in early.headers
        for series in SERIES:
            assert series in text, series
        for priority in ("interactive", "batch"):
            assert (
                'crossrank_request_duration_seconds_count{endpoint="/rerank",model="tiny-test-bert",'
                f'priority="{priority}",status="200"}} 0.0' in text
            )
        assert 'crossrank_dropped_pairs_total{model="tiny-test-bert",reason="deadline"} 0.0' in text
        assert (
            'model_info{model="tiny-test-bert",name="tiny-test-bert",provider="CPUExecutionProvider",'
            'variant="fp32",variant_choice="only candidate"}' in text
        )
        frozen = gc.get_freeze_count()
        srv.engine.gate.set()
        srv.wait_ready()
        # What was alive at ready is out of the cyclic collector's full passes (its stalls).
        assert gc.get_freeze_count() > frozen
        with srv.client() as c:
            assert c.post("/rerank", json=BODY).status_code == 200
        assert (
            metric(srv, 'crossrank_request_duration_seconds_count{endpoint="/rerank",status="200"}')
            == 1
        )
        assert metric(srv, 'crossrank_rejected_requests_total{reason="not_ready"}') == 1


def test_queue_full_is_503_with_retry_after_before_any_work(model_dir: ModelDir) -> None:
    with run_server(
        model_dir,
        gated=True,
        hold_warm_up=True,
        max_queued_pairs=10,
        max_passages=10,
        max_batch_pairs=2,
    ) as srv:
        engine = srv.engine
        assert engine is not None
        # Every batch (warm-up's too) takes 0.5 s or more for at most 2 pairs, so the measured
        # drain time of the 6 pairs the refused request waits for is over a second.
        engine.delay_s = 0.5
        engine.gate.set()
        srv.wait_ready()
        engine.gate.clear()
        body = {"query": "q", "passages": [f"passage {i}" for i in range(8)]}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(lambda: srv.client().post("/rerank", json=body))
            wait_for(lambda: metric(srv, "crossrank_inflight_requests") == 1)
            runs_before = len(engine.batches)
            with srv.client() as c:
                refused = c.post("/rerank", json=body)
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "queue_full"
            assert refused.headers["Retry-After"] == srv.retry_after(len(body["passages"]))
            assert int(refused.headers["Retry-After"]) >= 2
            engine.gate.set()
            assert first.result().status_code == 200
        assert sum(engine.batches[runs_before:]) == 8  # the refused request never ran
        assert metric(srv, 'crossrank_rejected_requests_total{reason="queue_full"}') == 1


def test_deadline_is_504_and_pairs_dropped(model_dir: ModelDir) -> None:
    with run_server(model_dir, gated=True, max_batch_pairs=2) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        srv.engine.gate.clear()
        with srv.client() as c:
            r = c.post("/rerank", json={**BODY, "timeout_ms": 100})
        assert r.status_code == 504
        assert r.json()["error"]["type"] == "deadline_exceeded"
        srv.engine.gate.set()
        # 3 pairs, batches of 2: the first batch was in the engine, the other pair was dropped.
        assert metric(srv, 'crossrank_dropped_pairs_total{reason="deadline"}') == 1
        assert (
            metric(srv, 'crossrank_request_duration_seconds_count{endpoint="/rerank",status="504"}')
            == 1
        )


def test_client_disconnect_drops_its_pairs(model_dir: ModelDir) -> None:
    with run_server(model_dir, gated=True, max_batch_pairs=1) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        srv.engine.gate.clear()
        payload = httpx.Request("POST", srv.url + "/rerank", json=BODY)
        raw = (
            f"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload.content)}\r\n\r\n"
        ).encode() + payload.content
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(raw)
            wait_for(lambda: metric(srv, "crossrank_inflight_requests") == 1)
        # The socket is closed: the server notices and drops the 2 pairs still queued.
        wait_for(lambda: metric(srv, 'crossrank_dropped_pairs_total{reason="disconnected"}') == 2)
        srv.engine.gate.set()
        wait_for(lambda: metric(srv, "crossrank_inflight_requests") == 0)
        with srv.client() as c:
            assert c.post("/rerank", json=BODY).status_code == 200


def test_engine_fault_fails_only_its_requests(model_dir: ModelDir) -> None:
    with run_server(model_dir, gated=True) as srv:
        srv.wait_ready()
        engine = srv.engine
        assert engine is not None
        poison = "zebra " * 50  # a long pair: its batch is the one that fails
        engine.fail_when = lambda batch: batch.input_ids.shape[1] > 40
        with srv.client() as c:
            bad = c.post("/rerank", json={"query": "q", "passages": ["a", poison]})
            good = c.post("/rerank", json=BODY)
            ready = c.get("/ready")
        assert bad.status_code == 500
        assert bad.json()["error"]["type"] == "engine_failure"
        assert bad.json()["error"]["id"]
        assert good.status_code == 200
        assert ready.status_code == 200  # the probe passed: the engine itself works
        engine.fail_when = lambda batch: True
        with srv.client() as c:
            assert c.post("/rerank", json=BODY).status_code == 500
            broken = c.get("/ready")
        assert broken.status_code == 503
        assert broken.json()["reason"] == "engine failing"
        engine.fail_when = lambda batch: False
        with srv.client() as c:
            assert c.post("/rerank", json=BODY).status_code == 200
            assert c.get("/ready").status_code == 200


def test_drain_on_stop_signal_answers_admitted_requests(model_dir: ModelDir) -> None:
    with run_server(model_dir, gated=True) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        srv.engine.gate.clear()
        with ThreadPoolExecutor(1) as pool:
            admitted = pool.submit(lambda: srv.client().post("/rerank", json=BODY))
            wait_for(lambda: metric(srv, "crossrank_inflight_requests") == 1)
            srv.server.handle_exit(15, None)  # what SIGTERM does
            assert srv.app.state.service.readiness() == "shutting down"
            srv.engine.gate.set()
            response = admitted.result()
        assert response.status_code == 200
        assert len(response.json()["results"]) == 3
        srv.thread.join(20)
        assert not srv.thread.is_alive()


def test_requests_arriving_while_draining_are_refused(model_dir: ModelDir) -> None:
    with run_server(model_dir) as srv:
        srv.wait_ready()
        srv.app.state.service.begin_drain()
        with srv.client() as c:
            r = c.post("/rerank", json=BODY)
            ready = c.get("/ready")
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "shutting_down"
        assert ready.status_code == 503


def test_tokenisation_runs_off_the_event_loop(server: RunningServer) -> None:
    # While a large request is being tokenised and scored, /health still answers promptly.
    passages = ["the blue sky over the river " * 20] * 1000
    done = threading.Event()
    statuses: list[int] = []

    def big() -> None:
        with server.client() as c:
            statuses.append(
                c.post("/rerank", json={"query": "sky", "passages": passages}).status_code
            )
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    worst = 0.0
    with server.client() as c:
        while not done.is_set():
            start = time.monotonic()
            assert c.get("/health").status_code == 200
            worst = max(worst, time.monotonic() - start)
    thread.join()
    assert statuses == [200]
    assert worst < 0.5


def test_batch_budget_is_automatic_per_device_unless_set(model_dir: ModelDir) -> None:
    passages = [f"passage {i} about the blue sky over the quiet river" for i in range(300)]
    for overrides, budget in (({}, 1024), ({"max_batch_tokens": 300}, 300)):
        with run_server(model_dir, gated=True, **overrides) as srv:
            srv.wait_ready()
            assert srv.engine is not None
            srv.engine.padded_tokens.clear()  # the warm-up's batches
            with srv.client() as c:
                assert c.post("/rerank", json={"query": "sky", "passages": passages}).is_success
            assert max(srv.engine.padded_tokens) <= budget
            # The budget is used, not undercut: most of the 300 pairs go in batches near it.
            assert max(srv.engine.padded_tokens) > budget * 0.75
