"""Service level: closed-loop clients against a real `crossrank serve` over loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.workload import Request


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


class Server:
    """`crossrank serve` in a subprocess, ready when /ready says so."""

    def __init__(self, model: Path, flags: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "crossrank.cli",
                "serve",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *flags,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ},
        )
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"crossrank serve {' '.join(flags)} exited")
            try:
                if httpx.get(self.url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server never became ready")
            time.sleep(0.2)

    def rss_mb(self) -> tuple[float, float]:
        return rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


@dataclass(frozen=True)
class LoadResult:
    clients: int
    passages: int
    requests: int
    seconds: float
    latencies: list[float]

    @property
    def pairs_per_s(self) -> float:
        return self.requests * self.passages / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))


async def closed_loop(url: str, requests: Sequence[Request], clients: int) -> LoadResult:
    """`clients` clients, each sending its next request as soon as the last is answered."""
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            request = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post(
                "/rerank", json={"query": request.query, "passages": request.passages}
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return LoadResult(clients, len(requests[0].passages), len(requests), seconds, latencies)
