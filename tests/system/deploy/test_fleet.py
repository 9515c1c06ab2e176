"""The local fleet (deploy/fleet/run.sh): real crossrank processes behind a real HAProxy on
loopback, under load while replicas are restarted one by one, killed, or the fleet is
overloaded. Each test prints the figures it measured (`pytest -s` shows them)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from support import metric_value, missing_tool

from crossrank.model.model_dir import ModelDir

ROOT = Path(__file__).resolve().parents[3]
RUN = ROOT / "deploy" / "fleet" / "run.sh"
REPLICAS = 2
BODY = {"query": "the capital of france", "passages": [f"passage {i} on paris" for i in range(20)]}


def free_run(count: int) -> int:
    """A port with the ``count`` ports after it free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65000 and all(_free(base + k) for k in range(1, count + 1)):
            return base
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Fleet:
    def __init__(self, model: ModelDir, directory: Path, **env: str) -> None:
        self.port = free_run(REPLICAS + 1)
        self.env = {
            **os.environ,
            "REPLICAS": str(REPLICAS),
            "PORT": str(self.port),
            "MODEL": str(model.path),
            "FLEET_DIR": str(directory),
            **env,
        }
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self, *args: str, timeout: float = 300) -> None:
        subprocess.run([str(RUN), *args], env=self.env, check=True, timeout=timeout)

    def replica_metrics(self) -> list[str]:
        return [
            httpx.get(f"http://127.0.0.1:{self.port + 1 + i}/metrics").text for i in range(REPLICAS)
        ]


@contextmanager
def fleet(model: ModelDir, directory: Path, **env: str) -> Iterator[Fleet]:
    if shutil.which("haproxy") is None:
        missing_tool("haproxy is not installed (make deploy-tools installs Debian's)")
    running = Fleet(model, directory, **env)
    try:
        running.run("up")
        yield running
    finally:
        running.run("down")


@contextmanager
def steady_load(url: str, clients: int = 2) -> Iterator[list[tuple[int, float]]]:
    """``clients`` clients sending BODY one after another until the block ends; every answer
    (status, seconds), a failed connection as status 0."""
    answers: list[tuple[int, float]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    status = http.post("/rerank", json=BODY).status_code
                except httpx.HTTPError:
                    status = 0
                answers.append((status, time.monotonic() - sent))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # load before the fault
        yield answers
        time.sleep(1.0)  # and after it
    finally:
        stop.set()
        for t in threads:
            t.join()


def summary(name: str, answers: list[tuple[int, float]]) -> Counter[int]:
    statuses = Counter(status for status, _ in answers)
    p99 = float(np.percentile([s for _, s in answers], 99))
    print(f"\n{name}: {len(answers)} requests, statuses {dict(statuses)}, p99 {p99:.3f} s")
    return statuses


@pytest.fixture(scope="module")
def two_replicas(model_dir: ModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet")
    # A replica's engine hangs while its stall file exists (crossrank.model.fault); the
    # watchdog calls a batch stalled after 1 s (its floor) here, 10 s by default.
    faults = {
        "CROSSRANK_TEST_STALL_FILE": str(directory / "stall-{port}"),
        "CROSSRANK_WATCHDOG_FLOOR_S": "1",
    }
    with fleet(model_dir, directory, **faults) as running:
        yield running


def test_a_rolling_restart_under_load_fails_no_request(two_replicas: Fleet) -> None:
    with steady_load(two_replicas.url) as answers:
        two_replicas.run("restart")
    statuses = summary("rolling restart", answers)
    assert statuses[200] == len(answers) > 20


def test_a_killed_replica_costs_no_request(two_replicas: Fleet) -> None:
    with steady_load(two_replicas.url) as answers:
        two_replicas.run("kill", "0")
        time.sleep(2.0)
    statuses = summary("kill -9 of one replica", answers)
    # What the dead replica held, and what reached it before its checks failed, was retried
    # on the other one by the balancer.
    assert statuses[200] == len(answers) > 20
    two_replicas.run("restart")  # brings it back for the tests after this one
    assert httpx.get(f"http://127.0.0.1:{two_replicas.port + 1}/ready").status_code == 200


def test_fleet_overload_reaches_the_client_retried_once_at_most(
    model_dir: ModelDir, tmp_path: Path
) -> None:
    small = {"CROSSRANK_MAX_QUEUED_PAIRS": "20", "CROSSRANK_MAX_PASSAGES": "20"}
    with fleet(model_dir, tmp_path, **small) as running:
        with ThreadPoolExecutor(16) as pool, httpx.Client(timeout=60) as http:
            answers = list(
                pool.map(lambda _: http.post(running.url + "/rerank", json=BODY), range(48))
            )
        refused = [a for a in answers if a.status_code == 503]
        print(f"\nfleet overload: {len(answers)} requests, {len(refused)} refused with 503")
        assert refused and all(a.is_success for a in answers if a not in refused)
        assert all(int(a.headers["Retry-After"]) >= 1 for a in refused)
        # A refusal is tried once more, on the other replica, and never again: every 503 the
        # client saw cost two refusals, and a retried request that was admitted the second time
        # one.
        queue_full = 'crossrank_rejected_requests_total{reason="queue_full"}'
        refusals = sum(metric_value(text, queue_full) for text in running.replica_metrics())
        print(f"fleet overload: {refusals:.0f} refusals by the replicas")
        assert 2 * len(refused) <= refusals <= 2 * len(refused) + (len(answers) - len(refused))


def test_a_stalled_replica_leaves_rotation_and_returns_after_recovery(two_replicas: Fleet) -> None:
    port = two_replicas.port + 1  # replica 0
    replica = f"http://127.0.0.1:{port}"
    stall = Path(two_replicas.env["FLEET_DIR"]) / f"stall-{port}"
    pairs_before = metric_value(httpx.get(replica + "/metrics").text, "crossrank_pairs_total")
    with steady_load(two_replicas.url) as answers, ThreadPoolExecutor(1) as pool:
        stall.touch()
        started = time.monotonic()
        hung = pool.submit(httpx.post, replica + "/rerank", json=BODY, timeout=60)
        while httpx.get(replica + "/ready").status_code == 200:
            assert time.monotonic() - started < 10, "the watchdog never marked the replica"
            time.sleep(0.05)
        out_after = time.monotonic() - started
        time.sleep(2.0)  # out of rotation: the balancer sends everything to replica 1
        stall.unlink()
        assert hung.result().status_code == 503  # failed at the stall, as the watchdog does
        while httpx.get(replica + "/ready").status_code != 200:
            assert time.monotonic() - started < 30, "the replica never came back"
            time.sleep(0.05)
        time.sleep(2.0)  # back in rotation (rise 2 x 500 ms)
    statuses = summary(f"stalled replica (unready after {out_after:.2f} s)", answers)
    # Within the watchdog's bound (its floor, 1 s here) and a check interval.
    assert out_after < 2.0
    # What the replica held when it stalled, and what reached it before its checks failed, was
    # refused with 503 and retried on the other replica; it took requests again once recovered.
    assert statuses[200] == len(answers) > 20
    pairs_after = metric_value(httpx.get(replica + "/metrics").text, "crossrank_pairs_total")
    assert pairs_after > pairs_before
