"""Priorities and per-key fair shares over real HTTP, with a gated engine: interactive work
overtakes queued batch work, batch work has its own room, a bad priority is a 422 naming where
it was sent, and a key flooding the server is refused (429) while another key is served."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support import RunningServer, metric, run_server, wait_for

from crossrank.http.invalid_budget import InvalidBudget
from crossrank.model.model_dir import ModelDir

KEYS = ("key-zero-0123456789", "key-one-0123456789")


def passages(n: int, word: str) -> list[str]:
    return [f"{word} passage {i} about rivers and cities" for i in range(n)]


def post(
    srv: RunningServer, body: dict, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, float]:
    """The answer and when it arrived (monotonic)."""
    with srv.client() as c:
        response = c.post("/rerank", json=body, headers=headers)
    return response, time.monotonic()


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        ({"priority": "urgent"}, {}, "priority"),
        ({"priority": 1}, {}, "priority"),
        ({}, {"X-Crossrank-Priority": "urgent"}, "X-Crossrank-Priority"),
    ],
)
@pytest.mark.parametrize("shape", ["passages", "documents"])
def test_an_unknown_priority_is_a_422_naming_where_it_was_sent(
    model_dir: ModelDir, body: dict, headers: dict[str, str], field: str, shape: str
) -> None:
    with run_server(model_dir) as srv, srv.client() as c:
        srv.wait_ready()
        sent = {"query": "q", shape: ["a", "b"], **body}
        response = c.post("/rerank", json=sent, headers=headers)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == field
        # The body's field wins over the header; either spelled right is served.
        fine = {"query": "q", shape: ["a", "b"], "priority": "batch"}
        assert c.post("/rerank", json=fine, headers=headers).status_code == 200
        ok = c.post(
            "/rerank", json={"query": "q", shape: ["a"]}, headers={"X-Crossrank-Priority": "Batch"}
        )
        assert ok.status_code == 200


def test_interactive_work_overtakes_queued_batch_work(model_dir: ModelDir) -> None:
    with run_server(model_dir, gated=True, max_batch_pairs=8) as srv:
        srv.wait_ready()
        engine = srv.engine
        assert engine is not None
        engine.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            # 30 batch pairs: the engine holds its first 8, 22 stay queued.
            batch = pool.submit(
                post, srv, {"query": "q", "passages": passages(30, "batch"), "priority": "batch"}
            )
            wait_for(lambda: metric(srv, "crossrank_queue_depth_pairs") == 22)
            # 100 interactive pairs: shortest-remaining-first alone would finish the 22 first.
            interactive = pool.submit(
                post, srv, {"query": "q", "passages": passages(100, "interactive")}
            )
            wait_for(lambda: metric(srv, "crossrank_queue_depth_pairs") == 122)
            engine.gate.set()
            (batch_answer, batch_done), (answer, done) = batch.result(), interactive.result()
        assert batch_answer.status_code == answer.status_code == 200
        assert done < batch_done
        # The batch request's running 8, the interactive 100 (13 batches), then its other 22.
        assert engine.batches[-17:] == [8] * 13 + [4, 8, 8, 6]
        duration = "crossrank_request_duration_seconds_count"
        assert metric(srv, f'{duration}{{status="200",priority="batch"}}') == 1
        assert metric(srv, f'{duration}{{status="200",priority="interactive"}}') == 1


def test_batch_work_has_its_own_room(model_dir: ModelDir) -> None:
    with run_server(
        model_dir, gated=True, max_passages=20, max_queued_pairs=20, max_batch_queued_pairs=20
    ) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        srv.engine.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(
                post, srv, {"query": "q", "passages": passages(20, "b"), "priority": "batch"}
            )
            wait_for(lambda: metric(srv, "crossrank_batch_reserved_pairs") == 20)
            refused, _ = post(
                srv, {"query": "q", "passages": ["x"]}, {"X-Crossrank-Priority": "batch"}
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "queue_full"
            assert "batch queue" in refused.json()["error"]["message"]
            # The interactive room is untouched by the batch work.
            interactive = pool.submit(post, srv, {"query": "q", "passages": passages(20, "i")})
            wait_for(lambda: metric(srv, "crossrank_reserved_pairs") == 20)
            srv.engine.gate.set()
            assert held.result()[0].status_code == interactive.result()[0].status_code == 200
        assert metric(srv, "crossrank_batch_reserved_pairs") == 0


def test_a_key_flooding_the_server_is_refused_while_another_key_is_served(
    model_dir: ModelDir,
) -> None:
    with run_server(
        model_dir, gated=True, max_passages=60, max_queued_pairs=100, api_keys=",".join(KEYS)
    ) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        srv.engine.gate.clear()
        flood, other = ({"Authorization": f"Bearer {key}"} for key in KEYS)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, srv, {"query": "q", "passages": passages(60, "a")}, flood)
            wait_for(lambda: metric(srv, "crossrank_reserved_pairs") == 60)
            refused, _ = post(srv, {"query": "q", "passages": passages(10, "a")}, flood)
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "key_over_share"
            assert int(refused.headers["Retry-After"]) >= 1
            # The other key is admitted within the room left, and served.
            served = pool.submit(post, srv, {"query": "q", "passages": passages(30, "b")}, other)
            wait_for(lambda: metric(srv, "crossrank_reserved_pairs") == 90)
            srv.engine.gate.set()
            assert first.result()[0].status_code == served.result()[0].status_code == 200
        rejected = 'crossrank_rejected_requests_total{reason="key_over_share"}'
        assert metric(srv, rejected) == 1


def test_a_key_that_keeps_sending_invalid_bodies_is_refused_from_its_headers(
    model_dir: ModelDir,
) -> None:
    with run_server(model_dir, api_keys=",".join(KEYS), invalid_per_s=0.5, invalid_burst=3) as srv:
        srv.wait_ready()
        noisy, other = ({"Authorization": f"Bearer {key}"} for key in KEYS)
        invalid = {"query": "q", "passages": ["a", ""]}
        with srv.client() as c:
            assert [
                c.post("/rerank", json=invalid, headers=noisy).status_code for _ in range(3)
            ] == [422] * 3
            # Its budget spent: refused before the body is parsed, valid or not, with when to
            # come back (a token every 2 s).
            for body in (invalid, {"query": "q", "passages": ["a"]}):
                refused = c.post("/rerank", json=body, headers=noisy)
                assert refused.status_code == 429
                assert refused.json()["error"]["type"] == "too_many_invalid"
                assert refused.headers["Retry-After"] == "2"
            # Another key is not touched by it.
            assert c.post(
                "/rerank", json={"query": "q", "passages": ["a"]}, headers=other
            ).is_success
        refused = 'crossrank_rejected_requests_total{reason="too_many_invalid"}'
        assert metric(srv, refused) == 2


def test_an_invalid_budget_refills_over_time() -> None:
    now = [0.0]
    budget = InvalidBudget(per_s=0.5, burst=2, clock=lambda: now[0])
    assert budget.refusal("key0") is None
    budget.charge("key0", 200)
    budget.charge("key0", 503)  # the server's refusals are not the client's mistakes
    budget.charge("key0", 422)
    assert budget.refusal("key0") is None
    budget.charge("key0", 404)
    refused = budget.refusal("key0")
    assert refused is not None and refused.retry_after_s == 2
    now[0] = 1.0
    assert budget.refusal("key0") is not None and budget.refusal("key0").retry_after_s == 1
    now[0] = 2.0
    assert budget.refusal("key0") is None
    # Without keys, or with the limit off, nothing is refused.
    budget.charge(None, 422)
    off = InvalidBudget(per_s=0, burst=1)
    off.charge("key0", 422)
    off.charge("key0", 422)
    assert off.refusal("key0") is None and budget.refusal(None) is None
