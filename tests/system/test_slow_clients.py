"""Slowloris: a bounded number of connections trickling their head or body, or sending nothing,
do not hold up other clients and are cut after header_timeout_s / body_timeout_s."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from support import metric, run_server

from crossrank.model.model_dir import ModelDir

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.0
SLOW_EACH = 20  # connections of each kind: head trickled, body trickled, silent
BODY = {"query": "the capital of france", "passages": ["paris", "a cat", "blue sky"]}
HEAD = b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@dataclass
class Slow:
    kind: str
    answer: bytes = b""
    cut_after_s: float | None = None


def trickle(port: int, slow: Slow, give_up_s: float) -> None:
    """Send a byte now and then, as a slowloris does, until the server closes the connection."""
    if slow.kind == "head":
        first, drip = HEAD, b"X"
    elif slow.kind == "body":
        first, drip = HEAD + b"Content-Length: 100000\r\n\r\n" + b'{"query": "', b"q"
    else:
        first, drip = b"", b""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.2)
        sock.sendall(first)
        while time.monotonic() - started < give_up_s:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                data = None
            except ConnectionResetError:
                data = b""
            if data == b"":
                slow.cut_after_s = time.monotonic() - started
                return
            if data:
                slow.answer += data
                continue
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(drip)


def open_slow(port: int, give_up_s: float) -> tuple[list[Slow], list[threading.Thread]]:
    slow = [Slow(kind) for kind in ("head", "body", "silent") for _ in range(SLOW_EACH)]
    threads = [threading.Thread(target=trickle, args=(port, s, give_up_s)) for s in slow]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # every slow connection is open
    return slow, threads


def test_slow_clients_do_not_hold_up_others(model_dir: ModelDir) -> None:
    # Bounds far beyond the test: the slow connections stay open throughout.
    with run_server(model_dir, header_timeout_s=60, body_timeout_s=60) as srv:
        srv.wait_ready()
        slow, threads = open_slow(int(srv.url.rsplit(":", 1)[1]), give_up_s=20.0)

        def served(i: int) -> int:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                return c.post("/rerank", json={**BODY, "query": f"q {i}"}).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(served, range(20)))
        still_open = sum(s.cut_after_s is None for s in slow)
        srv.server.should_exit = True  # closes the slow connections too
        for thread in threads:
            thread.join()
    assert statuses == [200] * 20
    assert still_open == len(slow)


def test_slow_clients_are_cut_at_their_bound(model_dir: ModelDir) -> None:
    with run_server(model_dir, header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S) as srv:
        srv.wait_ready()
        slow, threads = open_slow(int(srv.url.rsplit(":", 1)[1]), give_up_s=20.0)
        for thread in threads:
            thread.join()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/rerank", json=BODY).status_code == 200
    for s in slow:
        assert s.cut_after_s is not None, s.kind
        # Not before the bound; after it, within what a loaded 2-core machine adds.
        assert TIMEOUT_S * 0.9 <= s.cut_after_s < TIMEOUT_S + 5, (s.kind, s.cut_after_s)
        if s.kind == "body":
            # The body's bound is the app's: a 408 in the one error body, then the close.
            assert s.answer.startswith(b"HTTP/1.1 408"), s.answer[:100]
            assert b'"type":"request_timeout"' in s.answer
        else:
            assert s.answer == b""


def test_the_body_bound_is_counted(model_dir: ModelDir) -> None:
    with run_server(model_dir, body_timeout_s=0.5) as srv:
        srv.wait_ready()
        s = Slow("body")
        trickle(int(srv.url.rsplit(":", 1)[1]), s, 10.0)
        assert s.answer.startswith(b"HTTP/1.1 408")
        assert metric(srv, 'crossrank_rejected_requests_total{reason="body_timeout"}') == 1


def test_an_oversized_request_head_is_refused(model_dir: ModelDir) -> None:
    with run_server(model_dir, max_header_bytes=16 * 1024) as srv:
        srv.wait_ready()
        port = int(srv.url.rsplit(":", 1)[1])
        answers = {}
        for name, head in {
            "8 KB header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 8000 + b"\r\n\r\n",
            "1 MB header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 10**6 + b"\r\n\r\n",
            "100 KB of headers": b"GET /health HTTP/1.1\r\nHost: x\r\n"
            + b"X-A: aaaaaaaaaa\r\n" * 6000
            + b"\r\n",
            "100 KB path": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        }.items():
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(10)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(head)
                answers[name] = sock.recv(100)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/ready").status_code == 200
    assert answers["8 KB header"].startswith(b"HTTP/1.1 200")
    for name in ("1 MB header", "100 KB of headers", "100 KB path"):
        assert answers[name].startswith(b"HTTP/1.1 400"), (name, answers[name])
