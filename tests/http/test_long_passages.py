"""Long passages: windows on token boundaries with the configured overlap, the cap per passage,
max/first/mean aggregation, usage.chunks and the best window's span over HTTP, the admission
bound counting windows, and Cohere v2's max_tokens_per_doc."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from support import WORDS, RunningServer, run_server

from crossrank.features.chunking import Aggregation, aggregate
from crossrank.model.model_dir import ModelDir
from crossrank.model.tokenization import PairTokenizer

QUERY = "capital of france"
# Whole words of the tiny vocabulary: one token each, so a window's text is its tokens.
FILLER = [w for w in WORDS if w not in ("paris", "france", "capital", "city")]


def long_passage(words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(FILLER, words).tolist())


@pytest.fixture(scope="module")
def tokenizer(model_dir: ModelDir) -> PairTokenizer:
    meta = model_dir.metadata
    return PairTokenizer(model_dir.tokenizer_path, meta.max_query_tokens, meta.max_length)


def test_windows_overlap_by_the_stride_and_cover_the_passage(tokenizer: PairTokenizer) -> None:
    passage = long_passage(400)
    encoded = tokenizer.windows(16).encode(QUERY, [passage, "paris"], max_chunks=100)
    assert encoded.owners is not None and encoded.spans is not None
    windows = [s for s, o in zip(encoded.spans, encoded.owners, strict=True) if o == 0]
    assert len(windows) > 3 and encoded.owners.count(1) == 1
    assert all(p.length <= tokenizer.max_length for p in encoded.pairs)
    words = [passage[a:b].split() for a, b in windows]
    # Windows of whole tokens, from the passage's first to its last, each sharing 16 with the next.
    assert words[0][0] == passage.split()[0] and words[-1][-1] == passage.split()[-1]
    for before, after in itertools.pairwise(words):
        assert before[-16:] == after[:16]
    for a, b in windows:
        assert (a == 0 or passage[a - 1] == " ") and (b == len(passage) or passage[b] == " ")
    assert encoded.truncated == 0
    # The window budget is the model's: query, template and passage fill max_length exactly.
    assert encoded.pairs[0].length == tokenizer.max_length


def test_max_chunks_caps_the_windows_and_counts_the_cut(tokenizer: PairTokenizer) -> None:
    encoded = tokenizer.windows(8).encode(QUERY, [long_passage(400), "paris"], max_chunks=2)
    assert encoded.owners == [0, 0, 1]
    assert encoded.truncated == 1


def test_a_stride_as_long_as_a_window_is_refused(tokenizer: PairTokenizer) -> None:
    window = tokenizer.min_window
    with pytest.raises(ValueError, match="leaves no new tokens"):
        tokenizer.windows(window)
    tokenizer.windows(window - 1)


def test_aggregation() -> None:
    logits = np.array([1.0, 3.0, 2.0, 5.0, -1.0, -2.0], dtype=np.float32)
    owners = [0, 0, 0, 1, 2, 2]
    scores, best = aggregate(logits, owners, 3, Aggregation.MAX)
    assert scores.tolist() == [3.0, 5.0, -1.0] and best.tolist() == [1, 3, 4]
    scores, best = aggregate(logits, owners, 3, Aggregation.FIRST)
    assert scores.tolist() == [1.0, 5.0, -1.0] and best.tolist() == [0, 3, 4]
    scores, best = aggregate(logits, owners, 3, Aggregation.MEAN)
    assert scores.tolist() == [2.0, 5.0, -1.5] and best.tolist() == [1, 3, 4]


def _post(srv: RunningServer, path: str, body: dict) -> dict:
    with srv.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_chunked_scores_are_their_windows_scores(server: RunningServer) -> None:
    passages = [long_passage(300, 1), "paris is the capital of france", long_passage(200, 2)]
    base = {"query": QUERY, "passages": passages, "raw_scores": True}
    chunk = {"long_passages": "chunk", "max_chunks_per_doc": 50}
    chunked = _post(server, "/rerank", base | chunk)
    first = _post(server, "/rerank", base | chunk | {"chunk_aggregation": "first"})
    mean = _post(server, "/rerank", base | chunk | {"chunk_aggregation": "mean"})
    cut = _post(server, "/rerank", base)
    alone = [_post(server, "/rerank", base | chunk | {"passages": [p]}) for p in passages]
    by_index = {r["index"]: r for r in chunked["results"]}
    windows = [a["usage"]["chunks"] for a in alone]
    assert windows[0] > 2 and windows[1] == 1 and windows[2] > 1
    assert chunked["usage"] | {"tokens": 0} == {
        "pairs": 3, "chunks": sum(windows), "tokens": 0, "truncated": 0
    }  # fmt: skip
    assert cut["usage"]["chunks"] == 3 and cut["usage"]["truncated"] == 2
    # The best window's text, scored as a passage of its own, scores what the passage got.
    for i in (0, 2):
        span = by_index[i]["span"]
        text = passages[i][span["start"] : span["end"]]
        own = _post(server, "/rerank", {"query": QUERY, "passages": [text], "raw_scores": True})
        assert own["usage"]["truncated"] == 0
        assert by_index[i]["score"] == pytest.approx(own["results"][0]["score"], abs=1e-4)
    # first = the truncated pair's score (the same tokens); max >= mean.
    cut_scores = {r["index"]: r["score"] for r in cut["results"]}
    first_scores = {r["index"]: r["score"] for r in first["results"]}
    mean_scores = {r["index"]: r["score"] for r in mean["results"]}
    for i in range(3):
        assert first_scores[i] == pytest.approx(cut_scores[i], abs=1e-4)
        assert by_index[i]["score"] >= mean_scores[i] - 1e-6
    assert {r["index"]: r["span"]["chunk"] for r in first["results"]} == {0: 0, 1: 0, 2: 0}
    assert "span" not in cut["results"][0]


def test_relevant_text_past_the_cut_is_found_by_chunking(server: RunningServer) -> None:
    # The same filler, with the answer buried at its end, against the filler alone.
    filler = long_passage(400, 3)
    passages = [filler, filler + " paris is the capital city of france"]
    body = {"query": QUERY, "passages": passages, "raw_scores": True}
    cut = _post(server, "/rerank", body)["results"]
    chunked = _post(server, "/rerank", body | {"long_passages": "chunk", "max_chunks_per_doc": 50})
    # Truncated, both pairs are the same tokens: the same score.
    assert cut[0]["score"] == pytest.approx(cut[1]["score"], abs=1e-5)
    best = {r["index"]: r for r in chunked["results"]}
    assert best[1]["span"]["end"] == len(passages[1])
    assert best[1]["score"] != pytest.approx(best[0]["score"], abs=1e-5)


def test_windows_count_against_max_passages_and_the_queue(model_dir: ModelDir) -> None:
    passages = [long_passage(600, i) for i in range(3)]  # 7 windows each
    with run_server(model_dir, max_passages=10, max_queued_pairs=10, max_wait_ms=5) as srv:
        srv.wait_ready()
        with srv.client() as c:
            over = c.post(
                "/rerank",
                json={"query": QUERY, "passages": passages, "long_passages": "chunk"},
            )
            fits = c.post(
                "/rerank",
                json={"query": QUERY, "passages": passages, "long_passages": "chunk",
                      "max_chunks_per_doc": 3},
            )  # fmt: skip
            metrics = c.get("/metrics").text
    assert over.status_code == 422
    assert over.json()["error"]["field"] == "passages"
    assert "windows" in over.json()["error"]["message"]
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["chunks"] == 9
    # Every reservation given back: the unused bound at tokenisation, the rest as scored.
    assert 'crossrank_reserved_pairs{model="tiny-test-bert"} 0.0' in metrics


def test_server_default_and_cohere_max_tokens_per_doc(model_dir: ModelDir) -> None:
    text = long_passage(300, 4)
    with run_server(model_dir, long_passages="chunk", chunk_stride=8, max_wait_ms=5) as srv:
        srv.wait_ready()
        chunked = _post(srv, "/rerank", {"query": QUERY, "passages": [text]})
        info = _post_get(srv, "/info")
        v2 = _post(
            srv, "/v2/rerank", {"query": QUERY, "documents": [text], "max_tokens_per_doc": 5}
        )
        head = _post(srv, "/v2/rerank", {"query": QUERY, "documents": [" ".join(text.split()[:5])]})
    assert chunked["usage"]["chunks"] > 1 and "span" in chunked["results"][0]
    assert info["long_passages"]["default"] == "chunk"
    # Cut to its first 5 tokens (words here) first: then one window, scored as those words.
    assert v2["results"][0]["span"] == {
        "chunk": 0,
        "start": 0,
        "end": len(" ".join(text.split()[:5])),
    }
    assert v2["results"][0]["relevance_score"] == pytest.approx(
        head["results"][0]["relevance_score"], abs=1e-5
    )


def _post_get(srv: RunningServer, path: str) -> dict:
    with srv.client() as c:
        return c.get(path).json()
