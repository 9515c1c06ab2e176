"""The catalogue of hostile inputs, in one table: each gets a clear answer in the one error body
(or, where the input is legitimate after all, a normal one), and the service stays healthy."""

from __future__ import annotations

import dataclasses
import json
import socket
from dataclasses import dataclass

import httpx
import pytest
from support import RunningServer

JSON = {"content-type": "application/json"}
MB = 1024 * 1024


def body(**fields: object) -> bytes:
    return json.dumps({"query": "the capital", "passages": ["paris", "a cat"], **fields}).encode()


def deep(depth: int) -> bytes:
    return b'{"query": "q", "passages": ' + b"[" * depth + b"]" * depth + b"}"


@dataclass(frozen=True)
class Hostile:
    name: str
    content: bytes
    status: int
    error_type: str | None = None  # None: a normal answer
    field: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=lambda: dict(JSON))


CATALOGUE = [
    Hostile("empty query", body(query=""), 422, "invalid_request", "query"),
    Hostile("blank query", body(query=" \t\n "), 422, "invalid_request", "query"),
    Hostile("no passages", body(passages=[]), 422, "invalid_request", "passages"),
    Hostile("max_passages + 1", body(passages=["a"] * 1001), 422, "invalid_request", "passages"),
    Hostile("a 10 MB passage", body(passages=["x" * (10 * MB)]), 413, "body_too_large"),
    Hostile(
        "1,000 x 100 KB passages",
        body(passages=["y" * (100 * 1024)] * 1000),
        413,
        "body_too_large",
    ),
    Hostile("a number as passage", body(passages=["a", 7]), 422, "invalid_request", "passages[1]"),
    Hostile("null passage", body(passages=["a", None]), 422, "invalid_request", "passages[1]"),
    # Objects are passages too (rank_fields), so the 422 names the field it lacks.
    Hostile(
        "object passage", body(passages=[{"x": 1}]), 422, "invalid_request", "passages[0].text"
    ),
    Hostile("null query", body(query=None), 422, "invalid_request", "query"),
    Hostile("JSON nested 10,000 deep", deep(10_000), 422, "invalid_request", "body"),
    Hostile(
        "invalid UTF-8",
        b'{"query": "caf\xe9", "passages": ["a"]}',
        422,
        "invalid_request",
        "body",
    ),
    Hostile(
        "wrong content type",
        body(),
        422,
        "invalid_request",
        "body",
        headers={"content-type": "text/plain"},
    ),
    Hostile("no content type", body(), 422, "invalid_request", "body", headers={}),
    Hostile(
        "NaN literal",
        b'{"query": "q", "passages": ["a"], "top_k": NaN}',
        422,
        "invalid_request",
        "body",
    ),
    Hostile(
        "Infinity literal",
        b'{"query": "q", "passages": ["a"], "timeout_ms": Infinity}',
        422,
        "invalid_request",
        "body",
    ),
    Hostile(
        "duplicate keys",
        b'{"query": "q", "query": "other", "passages": ["a"]}',
        422,
        "invalid_request",
        "body",
    ),
    Hostile("top_k 0", body(top_k=0), 422, "invalid_request", "top_k"),
    Hostile("top_k negative", body(top_k=-1), 422, "invalid_request", "top_k"),
    Hostile("top_k a float", body(top_k=1.5), 422, "invalid_request", "top_k"),
    Hostile("top_k 1e400", b'{"query": "q", "passages": ["a"], "top_k": 1e400}', 422),
    Hostile(
        "an integer of 5,000 digits",
        b'{"query": "q", "passages": ["a"], "top_k": ' + b"9" * 5000 + b"}",
        422,
        "invalid_request",
        "body",
    ),
    Hostile("timeout_ms over an hour", body(timeout_ms=10**20), 422, "invalid_request"),
    Hostile("timeout_ms a string", body(timeout_ms="5"), 422, "invalid_request", "timeout_ms"),
    Hostile("truncate a string", body(truncate="no"), 422, "invalid_request", "truncate"),
    # Legitimate after all: fewer passages than top_k asks for returns them all (as Cohere does).
    Hostile("top_k larger than the list", body(top_k=50), 200),
    Hostile("top_k of 30 digits", body(top_k=10**30), 200),
    Hostile("empty body", b"", 422, "invalid_request", "body"),
    Hostile("JSON array body", b"[]", 422, "invalid_request"),
    Hostile("JSON string body", b'"hello"', 422, "invalid_request"),
    Hostile("truncated JSON", body()[:20], 422, "invalid_request", "body"),
    Hostile("NUL in a passage", body(passages=["a\u0000b"]), 200),
    Hostile(
        "lone surrogate escape",
        b'{"query": "q", "passages": ["\\ud800"]}',
        422,
        "invalid_request",
        "passages[0]",
    ),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.name)
def test_hostile_input(server: RunningServer, case: Hostile) -> None:
    with server.client() as c:
        response = c.post("/rerank", content=case.content, headers=case.headers)
        assert response.status_code == case.status, response.text[:300]
        if case.error_type is not None or case.status >= 400:
            error = response.json()["error"]
            assert set(error) <= {"type", "message", "field", "id"}
            assert error["message"]
            assert error["id"] == response.headers["X-Request-ID"]
            assert "Traceback" not in response.text
            if case.error_type is not None:
                assert error["type"] == case.error_type
            if case.field is not None:
                assert error.get("field") == case.field, error
        else:
            assert len(response.json()["results"]) >= 1
        # Healthy after: the next ordinary request is answered.
        assert c.get("/ready").status_code == 200
        assert c.post("/rerank", content=body(), headers=JSON).status_code == 200


def test_a_body_that_stops_mid_stream_leaves_the_service_healthy(server: RunningServer) -> None:
    content = body(passages=["the blue sky"] * 100)
    head = (
        f"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n\r\n"
    ).encode()
    port = int(server.url.rsplit(":", 1)[1])
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + content[: len(content) // 2])
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/ready").status_code == 200
        assert c.post("/rerank", content=body(), headers=JSON).status_code == 200
