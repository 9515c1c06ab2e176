"""Service level: load against a real HTTP server over loopback.

* :func:`closed_loop` — N clients, each sending its next request as soon as the last is answered:
  the throughput a system sustains at a concurrency.
* :func:`open_loop` — requests at Poisson arrival times at a fixed rate, whether or not earlier
  ones are answered: latency as a function of offered load (a closed loop hides queueing delay).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.workload import Request

Body = Callable[[Request], dict]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


@dataclass(frozen=True)
class Target:
    """Where and how to send a re-ranking request."""

    name: str
    url: str
    path: str
    body: Body


class Server:
    """A server in a subprocess (its command gets the port appended by ``port_flag``), ready
    when ``ready_path`` answers 200."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        rerank_path: str,
        body: Body,
        ready_path: str,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 600,
        log: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.target = Target(name, f"http://127.0.0.1:{self.port}", rerank_path, body)
        # The server's output goes to ``log`` when given (where a failed start says why).
        with open(log, "ab") if log else contextlib.nullcontext(subprocess.DEVNULL) as output:
            self.process = subprocess.Popen(
                [*command, str(self.port)],
                stdout=output,
                stderr=output,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.process.poll() is not None:
                where = f"; its output is in {log}" if log else ""
                raise RuntimeError(f"{name} exited during start-up ({' '.join(command)}){where}")
            try:
                if httpx.get(self.target.url + ready_path).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{name} never became ready")
            time.sleep(0.5)

    def rss_mb(self) -> tuple[float, float]:
        """The server's RSS and peak RSS (MB), children included (e.g. a shell wrapper's)."""
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        sizes = [rss_mb(pid) for pid in pids]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class LoadResult:
    pairs: int
    seconds: float
    latencies: list[float]
    refusals: int  # 503s answered with Retry-After, then retried (latency counts from the first)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))


@dataclass
class _Sent:
    latencies: list[float] = field(default_factory=list)
    refusals: int = 0


async def _send(http: httpx.AsyncClient, target: Target, request: Request, sent: _Sent) -> None:
    """One request, retried as a well-behaved client does when refused with 503 + Retry-After."""
    start = time.perf_counter()
    while True:
        response = await http.post(target.path, json=target.body(request))
        if response.status_code == 503 and "retry-after" in response.headers:
            sent.refusals += 1
            await asyncio.sleep(float(response.headers["retry-after"]))
            continue
        response.raise_for_status()
        sent.latencies.append(time.perf_counter() - start)
        return


def _client(target: Target, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=target.url, timeout=900, limits=limits)


async def closed_loop(target: Target, requests: Sequence[Request], clients: int) -> LoadResult:
    """``clients`` clients share ``requests``, each sending its next one when answered."""
    pending = list(reversed(requests))
    sent = _Sent()

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            await _send(http, target, pending.pop(), sent)

    async with _client(target, clients) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    pairs = sum(len(r.passages) for r in requests)
    return LoadResult(pairs, seconds, sent.latencies, sent.refusals)


async def open_loop(
    target: Target, requests: Sequence[Request], rate: float, seed: int = 0
) -> LoadResult:
    """``requests`` sent at Poisson arrivals of ``rate`` per second; latency from arrival."""
    rng = random.Random(seed)
    sent = _Sent()
    arrivals, t = [], 0.0
    for _ in requests:
        t += rng.expovariate(rate)
        arrivals.append(t)

    async with _client(target, len(requests)) as http:
        start = time.perf_counter()

        async def one(at: float, request: Request) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            await _send(http, target, request, sent)

        await asyncio.gather(*(one(a, r) for a, r in zip(arrivals, requests, strict=True)))
        seconds = time.perf_counter() - start
    pairs = sum(len(r.passages) for r in requests)
    return LoadResult(pairs, seconds, sent.latencies, sent.refusals)


def latency(target: Target, request: Request) -> float:
    """One request on its own."""
    start = time.perf_counter()
    httpx.post(target.url + target.path, json=target.body(request), timeout=900).raise_for_status()
    return time.perf_counter() - start
