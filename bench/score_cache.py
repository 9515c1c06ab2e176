"""The score cache on a workload where half the requests repeat an earlier one: pairs/s and p50
latency with the cache on and off, the two servers taking turns within one run (this machine is
shared: only the ratio within a run means much).

``python -m bench.score_cache --passages ../shared/data/trec-dl-2021/passages.jsonl.gz
--queries ../shared/data/trec-dl-2021/queries.tsv`` serves the bundled model twice (``crossrank
serve``, cache off and on), sends both the same sequence of requests, one at a time: each
request is either new or, with probability ``--repeat``, one sent before.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.workload import Request, Workload

MODEL = Path(__file__).resolve().parent.parent / "models" / "crossrank-minilm-l6"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, cache_bytes: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "crossrank.cli", "serve", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)]
    command += ["--score-cache-bytes", str(cache_bytes), "--no-access-log"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise TimeoutError("the server never became ready")


def sequence(workload: Workload, count: int, passages: int, repeat: float, seed: int) -> list:
    """``count`` requests, each new or (with probability ``repeat``) an earlier one again."""
    rng = random.Random(seed)
    fresh = iter(workload.requests(count, passages, seed))
    sent: list[Request] = []
    for _ in range(count):
        sent.append(rng.choice(sent) if sent and rng.random() < repeat else next(fresh))
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.score_cache", description=__doc__)
    parser.add_argument("--passages", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--passages-per-request", type=int, default=50)
    parser.add_argument("--repeat", type=float, default=0.5)
    parser.add_argument("--cache-mb", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    workload = Workload(args.passages, args.queries)
    requests = sequence(workload, args.requests, args.passages_per_request, args.repeat, 1)
    servers = {
        "off": start(args.model, 0, args.threads),
        "on": start(args.model, args.cache_mb << 20, args.threads),
    }
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    busy = dict.fromkeys(servers, 0.0)
    try:
        clients = {
            name: httpx.Client(base_url=url, timeout=300) for name, (_, url) in servers.items()
        }
        for i, request in enumerate(requests):
            # Taking turns, in alternating order, so both see the same load on the machine.
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                body = {"query": request.query, "passages": request.passages}
                started = time.monotonic()
                response = clients[name].post("/rerank", json=body)
                elapsed = time.monotonic() - started
                response.raise_for_status()
                latencies[name].append(elapsed)
                busy[name] += elapsed
        hits = clients["on"].get("/metrics").text
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(30)
    repeated = sum(any(r is request for r in requests[:i]) for i, request in enumerate(requests))
    pairs = args.requests * args.passages_per_request
    print(
        f"{args.requests} requests of {args.passages_per_request} passages, {repeated} of them "
        f"repeats; model {args.model.name}, {args.threads} threads, one request at a time"
    )
    print("| cache | pairs/s | p50 ms |")
    print("|---|---|---|")
    for name in servers:
        p50 = 1000 * statistics.median(latencies[name])
        print(f"| {name} | {pairs / busy[name]:.0f} | {p50:.0f} |")
    speedup = busy["off"] / busy["on"]
    p50_ratio = statistics.median(latencies["on"]) / statistics.median(latencies["off"])
    print(f"cache on / off: pairs/s x{speedup:.2f}, p50 x{p50_ratio:.2f}")
    for line in hits.splitlines():
        if line.startswith("crossrank_score_cache_") and not line.startswith("#"):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
