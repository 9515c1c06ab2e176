"""Request ids on every response and in every error body, JSON access lines, and no stack
trace in any response."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from support import RunningServer, run_server, wait_for

from crossrank.core.pipeline import Pipeline
from crossrank.model.model_dir import ModelDir
from crossrank.ops.logs import handler

BODY = {"query": "the capital of france", "passages": ["paris", "a cat", "blue sky"]}


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the service logs, as the JSON lines ``log_format=json`` writes."""
    out = io.StringIO()
    root = logging.getLogger()
    installed = handler("json", out)
    level = root.level
    root.addHandler(installed)
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(installed)
    root.setLevel(level)


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def access_lines(out: io.StringIO, count: int) -> list[dict]:
    """The access lines logged, once there are ``count``: a line is written as its answer
    goes out, so the client may read the answer first."""
    wait_for(lambda: len([x for x in lines(out) if x["logger"] == "crossrank.access"]) >= count)
    return [x for x in lines(out) if x["logger"] == "crossrank.access"]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("trace-4bf92f3577b34da6", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
        ("caf\xe9", False),
    ],
)
def test_a_sane_client_id_is_kept_else_one_is_made(
    server: RunningServer, sent: str, kept: bool
) -> None:
    with server.client() as c:
        response = c.post("/rerank", json=BODY, headers={"X-Request-ID": sent.encode("latin-1")})
    assert response.status_code == 200
    got = response.headers["X-Request-ID"]
    if kept:
        assert got == sent
    else:
        assert got != sent
        assert len(got) == 32
        int(got, 16)


def test_every_response_carries_its_id_and_errors_name_it(server: RunningServer) -> None:
    with server.client() as c:
        responses = [
            c.post("/rerank", json=BODY),
            c.get("/health"),
            c.get("/metrics"),
            c.post("/rerank", json={"query": "", "passages": ["a"]}),
            c.post("/rerank", content=b"{", headers={"content-type": "application/json"}),
            c.get("/nope"),
            c.get("/rerank"),
        ]
    ids = [r.headers["X-Request-ID"] for r in responses]
    assert len(set(ids)) == len(ids)
    for response in responses[3:]:
        assert response.json()["error"]["id"] == response.headers["X-Request-ID"]


def test_engine_failure_and_unexpected_errors_show_the_id_and_no_trace(
    model_dir: ModelDir, monkeypatch: pytest.MonkeyPatch, json_log: io.StringIO
) -> None:
    with run_server(model_dir, gated=True) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        srv.engine.fail_when = lambda batch: True
        with srv.client() as c:
            failed = c.post("/rerank", json=BODY, headers={"X-Request-ID": "engine-fails"})
        srv.engine.fail_when = lambda batch: False

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(Pipeline, "score", broken)
        with srv.client() as c:
            crashed = c.post("/rerank", json=BODY, headers={"X-Request-ID": "it-crashes"})
            after = c.get("/health")
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "engine_failure"
    assert failed.json()["error"]["id"] == "engine-fails"
    assert crashed.status_code == 500
    assert crashed.headers["X-Request-ID"] == "it-crashes"
    assert crashed.json()["error"] == {
        "type": "internal",
        "message": "internal error (request id it-crashes)",
        "id": "it-crashes",
    }
    for response in (failed, crashed):
        assert "Traceback" not in response.text
        assert "secret internals" not in response.text
        assert "injected engine fault" not in response.text
    assert after.status_code == 200
    # The trace is in the log, under the request's id.
    logged = lines(json_log)
    crash = [x for x in logged if x.get("request_id") == "it-crashes" and "exception" in x]
    assert len(crash) == 1
    assert "secret internals" in crash[0]["exception"]
    engine = [x for x in logged if x["message"].startswith("engine failure")]
    assert engine
    assert "injected engine fault" in engine[0]["exception"]
    # A request that failed after tokenisation still reports what it reached.
    access = {x["request_id"]: x for x in access_lines(json_log, 2)}
    assert access["engine-fails"]["status"] == 500
    assert access["engine-fails"]["passages"] == 3 and access["engine-fails"]["tokens"] > 0
    assert access["engine-fails"]["inference_ms"] is None


def test_one_json_access_line_per_request(server: RunningServer, json_log: io.StringIO) -> None:
    with server.client() as c:
        ok = c.post("/rerank", json=BODY, headers={"X-Request-ID": "access-ok"})
        bad = c.post("/rerank", json={"query": "q"}, headers={"X-Request-ID": "access-bad"})
    assert ok.status_code == 200
    assert bad.status_code == 422
    access = access_lines(json_log, 2)
    by_id = {x["request_id"]: x for x in access}
    assert len(access) == 2
    line = by_id["access-ok"]
    assert line["level"] == "INFO"
    assert line["route"] == "/rerank"
    assert line["method"] == "POST"
    assert line["status"] == 200
    assert line["passages"] == 3
    assert line["tokens"] == ok.json()["usage"]["tokens"]
    assert 0 <= line["queue_ms"] < line["total_ms"]
    assert 0 < line["inference_ms"] < line["total_ms"]
    assert line["time"].endswith("+00:00")
    refused = by_id["access-bad"]
    assert refused["status"] == 422
    assert refused["passages"] is None
    assert refused["total_ms"] > 0


def test_access_log_can_be_turned_off(model_dir: ModelDir, json_log: io.StringIO) -> None:
    with run_server(model_dir, access_log=False) as srv:
        srv.wait_ready()
        with srv.client() as c:
            assert c.post("/rerank", json=BODY).status_code == 200
    assert not [x for x in lines(json_log) if x["logger"] == "crossrank.access"]
