"""Soak: minutes of mixed load on one ``crossrank serve``, watching its memory and descriptors.

``--clients`` closed-loop clients send requests of 10, 100 and 1,000 passages (weights 6:3:1),
and now and then a hostile one (malformed JSON, too many passages, a non-string passage, a
duplicate key: each must be a 4xx) or one they abandon mid-way (a client timeout: the server
must drop its pairs). The server's RSS and open file descriptors are sampled every
``--sample-s``; after ``--warm-up-s`` their trend is fitted (least squares, per minute). An
error is any answer other than the expected: a 5xx besides 503 ``queue_full``, a 4xx to a
well-formed request, a non-4xx to a hostile one, or a transport error on a request the client
did not abandon.

    .venv/bin/python -m bench.soak --model models/crossrank-minilm-l6 \\
        --passages-file ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv --duration-s 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.service_bench import Server
from bench.systems import crossrank
from bench.workload import Workload

HOSTILE = [
    b'{"query": "q", "passages": ["a"',
    b'{"query": "q", "passages": ' + json.dumps(["a"] * 1001).encode() + b"}",
    b'{"query": "q", "passages": ["a", 3]}',
    b'{"query": "q", "query": "r", "passages": ["a"]}',
]
SIZES = (10, 100, 1000)
WEIGHTS = (6, 3, 1)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def per_minute_slope(times: list[float], values: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    return float(np.polyfit(np.array(times) / 60, np.array(values), 1)[0])


async def client(
    url: str,
    workload: Workload,
    rng: random.Random,
    until: float,
    tally: Counter[str],
    hostile_every: int,
    abandon_every: int,
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        sent = 0
        while time.monotonic() < until:
            sent += 1
            if sent % hostile_every == 0:
                body = rng.choice(HOSTILE)
                response = await http.post(
                    "/rerank", content=body, headers={"content-type": "application/json"}
                )
                if 400 <= response.status_code < 500:
                    tally["hostile_4xx"] += 1
                else:
                    tally[f"error: hostile answered {response.status_code}"] += 1
                continue
            request = workload.request(rng.choices(SIZES, WEIGHTS)[0])
            # A deadline far away: a 504 would end a slow request before a leak could show.
            body = {"query": request.query, "passages": request.passages, "timeout_ms": 600_000}
            if sent % abandon_every == 0:
                try:
                    await http.post("/rerank", json=body, timeout=0.05)
                    tally["abandoned_but_answered"] += 1
                except httpx.TimeoutException:
                    tally["abandoned"] += 1
                continue
            try:
                response = await http.post("/rerank", json=body)
            except httpx.TransportError as exc:
                tally[f"error: {type(exc).__name__}"] += 1
                continue
            if response.status_code == 200:
                tally[f"ok_{len(request.passages)}"] += 1
            elif response.status_code == 503 and response.json()["error"]["type"] == "queue_full":
                tally["queue_full"] += 1
                await asyncio.sleep(float(response.headers["retry-after"]))
            else:
                tally[f"error: {response.status_code} {response.text[:120]}"] += 1


async def reserved_pairs_settled(url: str, timeout_s: float) -> float:
    """``crossrank_reserved_pairs`` once it reaches 0, or its value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            text = (await http.get("/metrics")).text
            value = sum(  # over the models served
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "crossrank_reserved_pairs"
            )
            if value == 0 or time.monotonic() > deadline:
                return value
            await asyncio.sleep(1)


async def soak(server: Server, workload: Workload, args: argparse.Namespace) -> dict:
    pid = server.process.pid
    started = time.monotonic()
    until = started + args.duration_s
    tally: Counter[str] = Counter()
    samples: list[tuple[float, float, int]] = []

    async def sampler() -> None:
        while time.monotonic() < until:
            samples.append((time.monotonic() - started, server.rss_mb()[0], open_fds(pid)))
            await asyncio.sleep(args.sample_s)

    await asyncio.gather(
        sampler(),
        *(
            client(
                server.target.url,
                workload,
                random.Random(seed),
                until,
                tally,
                args.hostile_every,
                args.abandon_every,
            )
            for seed in range(args.clients)
        ),
    )
    # Every request ended, so no room may stay reserved once the engine has given back the
    # pairs of abandoned requests that were already in it.
    reserved = await reserved_pairs_settled(server.target.url, timeout_s=120)
    if reserved:
        tally[f"error: {reserved} pairs still reserved after the load"] += 1
    warm = [s for s in samples if s[0] >= args.warm_up_s]
    times = [s[0] for s in warm]
    return {
        "duration_s": args.duration_s,
        "clients": args.clients,
        "answers": dict(sorted(tally.items())),
        "errors": sum(n for key, n in tally.items() if key.startswith("error")),
        "reserved_pairs_at_end": reserved,
        "rss_mb_start_end_after_warm_up": [round(warm[0][1], 1), round(warm[-1][1], 1)],
        "rss_mb_max": round(max(s[1] for s in samples), 1),
        "rss_mb_per_min_after_warm_up": round(per_minute_slope(times, [s[1] for s in warm]), 2),
        "fds_start_end_after_warm_up": [warm[0][2], warm[-1][2]],
        "fds_max": max(s[2] for s in samples),
        "fds_per_min_after_warm_up": round(per_minute_slope(times, [s[2] for s in warm]), 2),
        "samples": [[round(t), round(r, 1), f] for t, r, f in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--passages-file", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--duration-s", type=float, default=300)
    parser.add_argument("--warm-up-s", type=float, default=60)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--hostile-every", type=int, default=10, help="Every Nth request.")
    parser.add_argument("--abandon-every", type=int, default=7, help="Every Nth request.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    workload = Workload(args.passages_file, args.queries)
    with crossrank(args.model, args.threads) as server:
        result = asyncio.run(soak(server, workload, args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
