"""Latency budgets: by its budget a request is answered 200 with what was scored, the scored
passages first and the rest in the order sent; its dropped pairs give their room back."""

from __future__ import annotations

import time

import cohere
import httpx
import numpy as np
import pytest
from support import RunningServer, metric, run_server, wait_for

from crossrank.core.cost import PairCost
from crossrank.core.ranking import rank
from crossrank.features.budget import Budget
from crossrank.model.model_dir import ModelDir

QUERY = "the capital of france"
PASSAGES = [f"passage {i} about paris and the river" for i in range(8)]
BATCH_S = 0.1


@pytest.fixture(scope="module")
def slow(model_dir: ModelDir):
    """A server whose engine takes 0.1 s a batch, one pair a batch."""
    with run_server(model_dir, gated=True, max_batch_pairs=1) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        srv.engine.delay_s = BATCH_S
        yield srv


def timed_post(srv: RunningServer, path: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with srv.client() as c:
        response = c.post(path, json=body)
    return response, time.monotonic() - started


def test_the_budget_is_kept_with_the_scored_first_and_the_rest_in_order(
    slow: RunningServer,
) -> None:
    body = {"query": QUERY, "passages": PASSAGES, "budget_ms": 350}
    r, took = timed_post(slow, "/rerank", body)
    assert r.status_code == 200, r.text
    assert took < 0.35 + BATCH_S + 0.3  # the budget, one batch, and the client's share
    assert r.headers["X-Crossrank-Partial"] == "true"
    body = r.json()
    scored = [x for x in body["results"] if x["scored"]]
    unscored = [x for x in body["results"] if not x["scored"]]
    assert body["usage"]["scored"] == len(scored) and body["usage"]["unscored"] == len(unscored)
    assert 0 < len(scored) < len(PASSAGES)
    assert body["results"] == scored + unscored  # scored first
    assert [x["score"] for x in scored] == sorted((x["score"] for x in scored), reverse=True)
    # Queued in the order sent: the first stage's top passages are the ones scored.
    assert {x["index"] for x in scored} == set(range(len(scored)))
    assert [x["index"] for x in unscored] == list(range(len(scored), len(PASSAGES)))
    assert all(x["score"] is None for x in unscored)
    # The pairs the budget dropped gave their room back.
    assert metric(slow, 'crossrank_dropped_pairs_total{reason="budget"}') > 0
    wait_for(lambda: metric(slow, "crossrank_reserved_pairs") == 0)


def test_min_score_and_top_k_on_a_partial_answer(slow: RunningServer) -> None:
    body = {"query": QUERY, "passages": PASSAGES, "budget_ms": 350, "raw_scores": True}
    with slow.client() as c:
        top = c.post("/rerank", json={**body, "top_k": 7}).json()["results"]
        kept = c.post("/rerank", json={**body, "min_score": -1e9}).json()["results"]
    assert len(top) == 7
    # min_score compares scores: a passage with none is not kept.
    assert kept and all(x["scored"] for x in kept)


def test_nothing_scorable_in_the_budget_is_answered_at_once_in_first_stage_order(
    slow: RunningServer,
) -> None:
    body = {"query": QUERY, "documents": PASSAGES, "budget_ms": 1}
    r, took = timed_post(slow, "/v1/rerank", body)
    assert r.status_code == 200 and took < 0.5
    body = r.json()
    assert [x["index"] for x in body["results"]] == list(range(len(PASSAGES)))
    assert all(x["scored"] is False and x["relevance_score"] == 0.0 for x in body["results"])
    assert body["usage"]["unscored"] == len(PASSAGES)


def test_without_a_budget_nothing_changes(slow: RunningServer) -> None:
    with slow.client() as c:
        r = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES[:2]})
    assert "X-Crossrank-Partial" not in r.headers
    assert all("scored" not in x for x in r.json()["results"])
    assert "scored" not in r.json()["usage"]


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"budget_ms": 0}, "greater than or equal to 1"),
        ({"budget_ms": 5000, "timeout_ms": 1000}, "above the request's deadline"),
        ({"budget_ms": 100, "long_passages": "chunk"}, "chunk"),
    ],
)
def test_bad_budgets_are_a_422_naming_the_field(slow: RunningServer, extra: dict, why: str) -> None:
    with slow.client() as c:
        r = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES, **extra})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "budget_ms" and why in r.json()["error"]["message"]


def test_the_cohere_sdk_parses_a_partial_answer(model_dir: ModelDir) -> None:
    # The server's default budget applies to a client that cannot send one.
    with run_server(model_dir, default_budget_ms=1) as srv:
        srv.wait_ready()
        client = cohere.ClientV2(api_key="unused", base_url=srv.url)
        answer = client.rerank(model="rerank-v3.5", query=QUERY, documents=PASSAGES)
        # ... but not to a request that chunks, which a budget would cut mid-passage.
        with srv.client() as c:
            body = {"query": QUERY, "passages": PASSAGES, "long_passages": "chunk"}
            chunked = c.post("/rerank", json=body)
    assert [r.index for r in answer.results] == list(range(len(PASSAGES)))
    assert all(r.relevance_score == 0.0 for r in answer.results)
    assert chunked.status_code == 200 and "scored" not in chunked.json()["usage"]


def test_known_logits_rank_first_and_the_rest_keep_their_order() -> None:
    logits = np.array([0.1, 5.0, -2.0, 3.0, 0.0], dtype=np.float32)
    known = np.array([True, False, True, True, False])
    assert rank(logits, known).tolist() == [3, 0, 2, 1, 4]
    assert rank(logits).tolist() == [1, 3, 0, 4, 2]


def test_a_budget_queues_only_the_pairs_it_can_pay_for() -> None:
    budget = Budget(until=10.0)
    lengths = [20] * 10 + [100] * 10  # buckets of 32 and 128 tokens
    unmeasured = PairCost()
    assert budget.affordable(9.0, None, lengths, unmeasured) == 20  # nothing priced yet: try
    cost = PairCost()
    cost.observe(32, pairs=10, seconds=0.01)  # 1 ms a short pair
    cost.observe(128, pairs=10, seconds=0.1)  # 10 ms a long one
    # 1 s left with no wait: everything (10 ms + 100 ms).
    assert budget.affordable(9.0, 0.0, lengths, cost) == 20
    # 0.06 s left, 0.09 s with the headroom: the 10 short pairs and 8 long ones.
    assert budget.affordable(9.94, 0.0, lengths, cost) == 18
    # A wait ahead shorter than the budget does not shrink the prefix (the scheduler serves
    # a small prefix first); a wait as long as the budget leaves nothing to queue.
    assert budget.affordable(9.0, 0.94, lengths, cost) == 20
    assert budget.affordable(9.0, 1.0, lengths, cost) == 0
    assert budget.affordable(10.0, 0.0, lengths, cost) == 0
