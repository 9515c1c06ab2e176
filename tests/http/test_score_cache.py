"""The score cache: keys by tokenised pair and model, LRU eviction within its byte bound, and over
HTTP a cached pair never reaches the engine while its answer equals an uncached one."""

from __future__ import annotations

import numpy as np
import pytest
from support import RunningServer, run_server

from crossrank.features.score_cache import ENTRY_BYTES, ScoreCache
from crossrank.model.model_dir import ModelDir
from crossrank.model.tokenization import EncodedPair
from crossrank.ops.metrics import Metrics

QUERY = "capital of france"
PASSAGES = ["paris is the capital of france", "the cat sat on the mat", "blue sky and water"]


def pair(*ids: int, types: int = 0) -> EncodedPair:
    array = np.asarray(ids, dtype=np.int64)
    return EncodedPair(array, np.full_like(array, types))


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": "m"}) or 0.0


def test_keys_follow_the_tokens_and_the_model() -> None:
    cache = ScoreCache(10_000, "model|int8|256", Metrics().for_model("m"))
    other = ScoreCache(10_000, "model|fp32|256", Metrics().for_model("m"))
    assert cache.key(pair(1, 2, 3)) == cache.key(pair(1, 2, 3))
    assert cache.key(pair(1, 2, 3)) != cache.key(pair(1, 2, 4))
    assert cache.key(pair(1, 2, 3)) != cache.key(pair(1, 2, 3, types=1))
    assert cache.key(pair(1, 2, 3)) != other.key(pair(1, 2, 3))


def test_lru_eviction_keeps_within_the_byte_bound() -> None:
    metrics = Metrics()
    cache = ScoreCache(3 * ENTRY_BYTES + ENTRY_BYTES // 2, "m", metrics.for_model("m"))
    keys = cache.keys([pair(i) for i in range(5)])
    cache.put(keys[:3], [0.0, 1.0, 2.0])
    assert cache.get([keys[0]]) == [0.0]  # 0 is now the most recent: 1 goes first
    cache.put(keys[3:], [3.0, 4.0])
    assert cache.get(keys) == [0.0, None, None, 3.0, 4.0]
    assert cache.bytes == 3 * ENTRY_BYTES <= cache.max_entries * ENTRY_BYTES
    assert sample(metrics, "crossrank_score_cache_bytes") == 3 * ENTRY_BYTES
    assert sample(metrics, "crossrank_score_cache_hits_total") == 4
    assert sample(metrics, "crossrank_score_cache_misses_total") == 2


def test_cached_pairs_skip_the_queue_and_answer_the_same(
    model_dir: ModelDir, server: RunningServer
) -> None:
    body = {"query": QUERY, "passages": PASSAGES, "raw_scores": True}
    with run_server(model_dir, gated=True, score_cache_bytes=1 << 20, max_wait_ms=5) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        with srv.client() as c:
            warm = len(srv.engine.batches)
            first = c.post("/rerank", json=body).json()
            scored = sum(srv.engine.batches[warm:])
            again = c.post("/rerank", json=body).json()
            after_repeat = sum(srv.engine.batches[warm:])
            mixed = c.post("/rerank", json=body | {"passages": [*PASSAGES, "a new one"]}).json()
            after_mixed = sum(srv.engine.batches[warm:])
            metrics = c.get("/metrics").text
    with server.client() as c:
        uncached = c.post("/rerank", json=body).json()
    assert scored == 3 and after_repeat == 3 and after_mixed == 4
    assert again["results"] == first["results"]
    assert again["usage"] == first["usage"]
    assert [r["index"] for r in mixed["results"] if r["index"] < 3] == [
        r["index"] for r in first["results"]
    ]
    # An answer from the cache is the one the model gives (to fp tolerance across batches).
    assert [r["index"] for r in again["results"]] == [r["index"] for r in uncached["results"]]
    assert [r["score"] for r in again["results"]] == pytest.approx(
        [r["score"] for r in uncached["results"]], abs=1e-5
    )
    assert 'crossrank_score_cache_hits_total{model="tiny-test-bert"} 6.0' in metrics
    assert 'crossrank_score_cache_misses_total{model="tiny-test-bert"} 4.0' in metrics
    assert 'crossrank_reserved_pairs{model="tiny-test-bert"} 0.0' in metrics
