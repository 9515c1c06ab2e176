"""Overload: how fast refusals come back, and whether admitted work keeps its throughput.

Fires ``--concurrent`` requests of ``--passages`` passages at once at a fresh ``crossrank serve``
(the issue's case: 24 x 1,000 against a queue bound that admits 4), then the same burst again
every second for ``--sustain-s`` seconds, and reports the latency of the 503s (p50/p99/max, and
the first burst's slowest), the admitted pairs/s against a baseline that sends only as many
requests as the queue admits, and the server's RSS. Bodies are encoded before the clock starts,
so the client's JSON encoding is not counted in any latency.

    .venv/bin/python -m bench.overload --model models/crossrank-minilm-l6 \\
        --passages-file ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.systems import crossrank
from bench.workload import Workload


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float  # from its sending
    sent_at: float  # from the start of the load
    done_at: float
    pairs: int


async def overload(
    url: str, bodies: list[bytes], pairs: int, burst: int, sustain_s: float
) -> tuple[list[Answer], float]:
    """``burst`` requests at once, then another ``burst`` every second for ``sustain_s``
    seconds, cycling through ``bodies``; the answers, and seconds until the last one."""
    connections = burst * (1 + int(sustain_s))
    # aiohttp, not httpx: on a 2-core machine shared with the server, httpx's pure-Python
    # HTTP/1.1 made the client the slow side of a refusal (its p99 was many times the slowest
    # refusal in the server's own histogram), so the bench measured itself.
    # Idle connections are dropped before the server's keep-alive timeout (uvicorn's 5 s) can
    # close one under a request being sent on it (aiohttp keeps them 15 s by default).
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=4)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        # Open the connections first, so a connect is not timed as part of a refusal.
        await asyncio.gather(*(_health(http) for _ in range(connections)))

        started = time.perf_counter()

        async def one(body: bytes) -> Answer:
            sent = time.perf_counter()
            headers = {"content-type": "application/json"}
            async with http.post("/rerank", data=body, headers=headers) as response:
                await response.read()
            now = time.perf_counter()
            return Answer(response.status, now - sent, sent - started, now - started, pairs)

        tasks: list[asyncio.Task[Answer]] = []
        queue = itertools.cycle(bodies)
        while True:
            tasks += [asyncio.create_task(one(next(queue))) for _ in range(burst)]
            if time.perf_counter() - started >= sustain_s:
                break
            await asyncio.sleep(1.0)
        answers = await asyncio.gather(*tasks)
        return list(answers), time.perf_counter() - started


async def _health(http: aiohttp.ClientSession) -> None:
    async with http.get("/health") as response:
        await response.read()


def refusal_buckets(metrics_text: str) -> dict[str, float]:
    """Share of /rerank 503s within each of crossrank_request_duration_seconds' bounds (summed
    over the models and priorities)."""
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "crossrank_request_duration_seconds_bucket"
                and labels.get("endpoint") == "/rerank"
                and labels.get("status") == "503"
            ):
                bound = float(labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    total = counts.pop(float("inf"))
    return {f"{1000 * b:g}": round(n / total, 3) for b, n in counts.items() if b <= 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--passages-file", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--concurrent", type=int, default=24)
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--max-queued-pairs", type=int, default=4000)
    parser.add_argument(
        "--sustain-s",
        type=float,
        default=10,
        help="Keep sending a burst every second for this long after the first.",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--engine-nice",
        type=int,
        default=10,
        help="The server's engine_nice (0: inference threads at the event loop's priority).",
    )
    args = parser.parse_args()

    workload = Workload(args.passages_file, args.queries)
    admitted = args.max_queued_pairs // args.passages
    flags = ["--max-queued-pairs", str(args.max_queued_pairs)]
    flags += ["--max-passages", str(args.passages), "--engine-nice", str(args.engine_nice)]
    with crossrank(args.model, args.threads, flags) as server:
        url = server.target.url

        def bodies(count: int, seed: int) -> list[bytes]:
            requests = workload.requests(count, args.passages, seed)
            # No deadline in the way: every admitted request is answered, however long it waits.
            return [
                json.dumps(
                    {"query": r.query, "passages": r.passages, "timeout_ms": 3_600_000}
                ).encode()
                for r in requests
            ]

        # Baseline: only what the queue admits at once, sent together.
        alone, alone_s = asyncio.run(overload(url, bodies(admitted, 0), args.passages, admitted, 0))
        assert all(a.status == 200 for a in alone), [a.status for a in alone]
        rss_before = server.rss_mb()[0]
        answers, _ = asyncio.run(
            overload(
                url,
                bodies(2 * args.concurrent, 1),
                args.passages,
                args.concurrent,
                args.sustain_s,
            )
        )
        rss_now, rss_peak = server.rss_mb()
        server_side = refusal_buckets(httpx.get(url + "/metrics").text)
    statuses: dict[int, int] = {}
    for a in answers:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    refusals = [a.seconds for a in answers if a.status == 503]
    served = [a for a in answers if a.status == 200]
    result = {
        "statuses": statuses,
        "refusals": len(refusals),
        "refusal_ms_p50": round(1000 * float(np.percentile(refusals, 50)), 1),
        "refusal_ms_p99": round(1000 * float(np.percentile(refusals, 99)), 1),
        "refusal_ms_max": round(1000 * max(refusals), 1),
        # The case alone: the first burst, which meets an idle server and whose
        # admitted requests are parsed and tokenised while its refusals are answered.
        "first_burst_refusal_ms_max": round(
            1000 * max(a.seconds for a in answers if a.status == 503 and a.sent_at < 0.5), 1
        ),
        # Admitted pairs/s: pairs answered 200 over the time until the last of them.
        "admitted_pairs_per_s_alone": round(admitted * args.passages / alone_s, 1),
        "admitted_pairs_per_s_under_overload": round(
            sum(a.pairs for a in served) / max(a.done_at for a in served), 1
        ),
        # The server's own view (from arrival of the request head to the answer), free of the
        # client's queueing: the share of 503s answered within each histogram bucket.
        "server_503_share_within_ms": server_side,
        "rss_mb_after_baseline": round(rss_before, 1),
        "rss_mb_end": round(rss_now, 1),
        "rss_mb_peak": round(rss_peak, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
