"""SIGTERM under load, on a real ``crossrank serve`` process: every admitted request is
answered, new ones get 503 shutting_down while the listener stays open for drain_delay_s, and
the process exits within drain_grace_s. Its logs are JSON lines throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support import free_port, metric_value

from crossrank.model.model_dir import ModelDir

pytestmark = pytest.mark.slow

DELAY_S = 2.0
GRACE_S = 30.0
LOADED = 6  # requests in flight when the signal comes
PASSAGES = [
    f"the blue sky over the river and the city of paris in france {i}" * 3 for i in range(1000)
]


def sample(url: str, name: str) -> float:
    return metric_value(httpx.get(url + "/metrics").text, name)


def all_admitted_some_unanswered(url: str) -> bool:
    # Admission precedes tokenisation, so LOADED tokenisations mean LOADED admissions.
    tokenised = sample(url, "crossrank_tokenization_seconds_count")
    return tokenised >= LOADED and sample(url, "crossrank_inflight_requests") >= 1


def test_sigterm_under_load_answers_the_admitted_refuses_the_new_and_exits(
    model_dir: ModelDir, tmp_path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stderr = (tmp_path / "stderr").open("w+")
    command = [sys.executable, "-m", "crossrank.cli", "serve", "--model", str(model_dir.path)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
    command += ["--max-batch-tokens", "256", "--max-queued-pairs", "10000"]
    command += ["--drain-delay-s", str(DELAY_S), "--drain-grace-s", str(GRACE_S)]
    process = subprocess.Popen(
        command,
        env={**os.environ, "CROSSRANK_LOG_FORMAT": "json"},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the server exited during start-up"
            assert time.monotonic() < deadline, "the server never became ready"
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

        def rerank(i: int) -> httpx.Response:
            body = {"query": f"query {i}", "passages": PASSAGES}
            return httpx.post(url + "/rerank", json=body, timeout=GRACE_S)

        with ThreadPoolExecutor(LOADED) as pool:
            admitted = [pool.submit(rerank, i) for i in range(LOADED)]
            deadline = time.monotonic() + 60
            while not all_admitted_some_unanswered(url):
                assert time.monotonic() < deadline, "the load never got in"
                time.sleep(0.02)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            # Inside the delay: the port still answers, with 503 shutting_down.
            late = httpx.post(url + "/rerank", json={"query": "q", "passages": ["a"]})
            ready = httpx.get(url + "/ready")
            answered_while_open = time.monotonic() - signalled
            answers = [f.result() for f in admitted]
        assert answered_while_open < DELAY_S
        assert late.status_code == 503
        assert late.json()["error"]["type"] == "shutting_down"
        assert "Retry-After" in late.headers
        assert ready.status_code == 503
        for response in answers:
            assert response.status_code == 200
            assert len(response.json()["results"]) == len(PASSAGES)
        process.wait(timeout=GRACE_S)
        drain_s = time.monotonic() - signalled
        print(f"\ndrain: exited {drain_s:.2f} s after SIGTERM (delay {DELAY_S} s)")
        assert DELAY_S <= drain_s < GRACE_S
        assert process.returncode == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr.seek(0)
    lines = [json.loads(line) for line in stderr.read().splitlines()]
    access = [x for x in lines if x["logger"] == "crossrank.access" and x["route"] == "/rerank"]
    assert sorted(x["status"] for x in access) == [200] * LOADED + [503]
    assert any("draining" in x["message"] for x in lines)
    assert not [x for x in lines if x["level"] == "ERROR"]
