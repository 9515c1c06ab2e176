"""The API over real HTTP against a running uvicorn with the tiny exported model."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support import RunningServer, run_server

from crossrank.model.model_dir import ModelDir

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "the cat sat on the mat",
    "the river runs to the sea and the sky is blue",
    "france is a country",
    "a dog",
    "water fire earth and the blue sky",
]


def test_rerank_returns_every_passage_sorted(server: RunningServer) -> None:
    with server.client() as c:
        r = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = [x["score"] for x in body["results"]]
    assert sorted(x["index"] for x in body["results"]) == list(range(len(PASSAGES)))
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores)
    assert "passage" not in body["results"][0]
    assert body["model"] == "tiny-test-bert"
    assert body["usage"]["pairs"] == len(PASSAGES)
    assert body["usage"]["tokens"] > len(PASSAGES) * 3
    assert body["usage"]["truncated"] == 0


def test_top_k_raw_scores_and_passages(server: RunningServer) -> None:
    with server.client() as c:
        full = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES}).json()
        raw = c.post(
            "/rerank",
            json={
                "query": QUERY,
                "passages": PASSAGES,
                "top_k": 2,
                "raw_scores": True,
                "return_passages": True,
            },
        ).json()
    assert len(raw["results"]) == 2
    for got, want in zip(raw["results"], full["results"][:2], strict=True):
        assert got["index"] == want["index"]
        assert got["passage"] == PASSAGES[got["index"]]
        # score = sigmoid(logit)
        assert 1 / (1 + math.exp(-got["score"])) == pytest.approx(want["score"], abs=1e-6)


def test_ties_are_ordered_by_index(server: RunningServer) -> None:
    passages = ["the same passage", "another one", "the same passage", "the same passage"]
    with server.client() as c:
        body = c.post("/rerank", json={"query": QUERY, "passages": passages}).json()
    same = [x["index"] for x in body["results"] if x["index"] != 1]
    assert same == [0, 2, 3]


def test_scores_identical_alone_and_batched(server: RunningServer) -> None:
    with server.client() as c:
        alone = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES}).json()
    others = [
        {
            "query": f"query number {i} about the sky",
            "passages": [p * (1 + i % 3) for p in PASSAGES],
        }
        for i in range(12)
    ]

    def post(body: dict) -> dict:
        with server.client() as c:
            return c.post("/rerank", json=body).json()

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, b) for b in others]
        mine = pool.submit(post, {"query": QUERY, "passages": PASSAGES})
        [f.result() for f in futures]
        batched = mine.result()
    assert [x["index"] for x in batched["results"]] == [x["index"] for x in alone["results"]]
    for a, b in zip(alone["results"], batched["results"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": "", "passages": ["a"]}, "query"),
        ({"query": "   ", "passages": ["a"]}, "query"),
        ({"passages": ["a"]}, "query"),
        ({"query": "q", "passages": []}, "passages"),
        ({"query": "q", "passages": ["a", 3]}, "passages[1]"),
        ({"query": "q", "passages": ["a", ""]}, "passages[1]"),
        ({"query": "q", "passages": "a"}, "passages"),
        ({"query": 5, "passages": ["a"]}, "query"),
        ({"query": "q", "passages": ["a"], "top_k": 0}, "top_k"),
        ({"query": "q", "passages": ["a"], "timeout_ms": 0}, "timeout_ms"),
        ({"query": "q", "passages": ["a"], "unknown": 1}, "unknown"),
        ({"query": "q", "passages": ["a"] * 1001}, "passages"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    server: RunningServer, body: dict, field: str
) -> None:
    with server.client() as c:
        r = c.post("/rerank", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["field"] == field
    assert error["message"]


def test_malformed_json_is_422(server: RunningServer) -> None:
    with server.client() as c:
        r = c.post("/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "body"


def test_truncate_false_names_the_long_passage(server: RunningServer) -> None:
    long = "water " * 400
    with server.client() as c:
        r = c.post("/rerank", json={"query": QUERY, "passages": ["a", long], "truncate": False})
        ok = c.post("/rerank", json={"query": QUERY, "passages": ["a", long]})
        long_query = c.post(
            "/rerank", json={"query": "sky " * 100, "passages": ["a"], "truncate": False}
        )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "passages[1]"
    assert ok.status_code == 200
    assert ok.json()["usage"]["truncated"] == 1
    assert long_query.status_code == 422
    assert long_query.json()["error"]["field"] == "query"


def test_body_over_limit_is_413(model_dir: ModelDir) -> None:
    with run_server(model_dir, max_body_bytes=2048) as srv:
        srv.wait_ready()
        with srv.client() as c:
            r = c.post("/rerank", json={"query": "q", "passages": ["x" * 4000]})

            def chunks():
                yield b'{"query": "q", "passages": ["'
                for _ in range(10):
                    yield b"y" * 500
                yield b'"]}'

            streamed = c.post(
                "/rerank", content=chunks(), headers={"content-type": "application/json"}
            )
            small = c.post("/rerank", json={"query": "q", "passages": ["x"]})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "body_too_large"
    assert streamed.status_code == 413
    assert streamed.json()["error"]["type"] == "body_too_large"
    assert small.status_code == 200


def test_cohere_compatible_endpoint(server: RunningServer) -> None:
    docs = [PASSAGES[0], {"text": PASSAGES[1]}, PASSAGES[2]]
    with server.client() as c:
        r = c.post(
            "/v1/rerank",
            json={
                "model": "rerank-english-v3.0",
                "query": QUERY,
                "documents": docs,
                "top_n": 2,
                "return_documents": True,
                "max_tokens_per_doc": 512,
            },
        )
        v2 = c.post("/v2/rerank", json={"query": QUERY, "documents": docs})
        native = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES[:3]}).json()
        bad = c.post("/v1/rerank", json={"query": QUERY, "documents": ["a", ""]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["id"], str)
    assert "meta" in body
    assert len(body["results"]) == 2
    for got, want in zip(body["results"], native["results"], strict=False):
        assert got["index"] == want["index"]
        assert got["relevance_score"] == pytest.approx(want["score"], abs=1e-6)
        text = docs[got["index"]]
        assert got["document"]["text"] == (text if isinstance(text, str) else text["text"])
    assert v2.status_code == 200
    assert "document" not in v2.json()["results"][0]
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "documents[1]"


def test_the_openapi_documents_one_error_body_clients_can_read(server: RunningServer) -> None:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
        sent = c.post("/rerank", json={"query": "", "passages": ["a"]}).json()
    body = spec["components"]["schemas"]["ErrorBody"]
    assert {"error", "message", "detail"} <= set(body["required"])
    # What is documented is what is sent.
    assert set(sent) == set(body["properties"])
    assert sent["message"] == sent["detail"] == sent["error"]["message"]
    rerank = spec["paths"]["/rerank"]["post"]["responses"]
    for status in ("422", "503"):
        schema = rerank[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}


def test_health_docs_and_unknown_routes(server: RunningServer) -> None:
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/docs").status_code == 200
        assert "/rerank" in c.get("/openapi.json").json()["paths"]
        missing = c.get("/nope")
        wrong = c.get("/rerank")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    assert wrong.status_code == 405
    assert wrong.json()["error"]["type"] == "method_not_allowed"


def test_many_passages_near_the_limit(server: RunningServer) -> None:
    passages = [f"passage {i} about {PASSAGES[i % len(PASSAGES)]}" for i in range(1000)]
    with server.client() as c:
        r = c.post("/rerank", json={"query": QUERY, "passages": passages, "top_k": 10})
    assert r.status_code == 200
    assert len(r.json()["results"]) == 10
    assert r.json()["usage"]["pairs"] == 1000


def test_http_errors_use_the_one_shape(server: RunningServer) -> None:
    with server.client() as c:
        r = c.post("/rerank", content=b"[]", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert set(r.json()["error"]) >= {"type", "message", "field"}


def test_concurrent_clients_all_answered(server: RunningServer) -> None:
    def post(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/rerank", json={"query": f"q {i}", "passages": PASSAGES}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(post, range(48))) == {200}
