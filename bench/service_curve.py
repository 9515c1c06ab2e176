"""One replica's service curve for large requests: what the capacity plan (bench.capacity) is
built from.

Starts a fresh ``crossrank serve`` and times its start until ``/ready``; measures one request's
idle latency (median of ``--idle``) and how much of it the engine spent (its batches' inference
seconds, from /metrics); the saturated rate (closed loop, ``--clients`` clients); then, for each
``--loads`` fraction of that rate, ``--requests`` requests at Poisson arrival times, open loop.
A 503 is counted as a refusal and not retried. Per level it keeps every answered request's
latency, the rate the arrivals actually came at, and, from /metrics sampled every second, the
engine's busy ratio (inference seconds per second, the HorizontalPodAutoscaler's signal), the
mean queue depth and the mean pairs holding admission room. Writes JSON (``--out``).

    .venv/bin/python -m bench.service_curve --model models/crossrank-minilm-l6 \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv --out bench/results/service-curve.json
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.systems import crossrank
from bench.workload import Workload, served_workload_parser

HEADERS = {"Content-Type": "application/json"}
SAMPLED = (
    "crossrank_batch_inference_seconds_sum",
    "crossrank_queue_depth_pairs",
    "crossrank_reserved_pairs",
    "crossrank_tokens_total",
    "crossrank_pairs_total",
)


def totals(metrics_text: str) -> dict[str, float]:
    """The sampled series, summed over their labels (models)."""
    out = dict.fromkeys(SAMPLED, 0.0)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


async def scrape(http: aiohttp.ClientSession) -> dict[str, float]:
    async with http.get("/metrics") as response:
        return totals(await response.text())


async def post(http: aiohttp.ClientSession, body: bytes) -> tuple[int, float]:
    sent = time.perf_counter()
    async with http.post("/rerank", data=body, headers=HEADERS) as response:
        await response.read()
        return response.status, time.perf_counter() - sent


async def idle(http: aiohttp.ClientSession, bodies: list[bytes]) -> dict[str, float]:
    """One request at a time: median latency, the median inference seconds each took, and the
    real tokens per pair."""
    latencies, engine, tokens = [], [], []
    for body in bodies:
        before = await scrape(http)
        status, seconds = await post(http, body)
        assert status == 200, status
        after = await scrape(http)
        latencies.append(seconds)
        name = "crossrank_batch_inference_seconds_sum"
        engine.append(after[name] - before[name])
        tokens.append(
            (after["crossrank_tokens_total"] - before["crossrank_tokens_total"])
            / (after["crossrank_pairs_total"] - before["crossrank_pairs_total"])
        )
    return {
        "latency_s": statistics.median(latencies),
        "engine_s": statistics.median(engine),
        "tokens_per_pair": statistics.fmean(tokens),
    }


async def saturated(http: aiohttp.ClientSession, bodies: list[bytes], clients: int) -> float:
    """Requests per second with ``clients`` clients each sending its next when answered."""
    pending = list(bodies)

    async def client() -> None:
        while pending:
            status, _ = await post(http, pending.pop())
            assert status == 200, status

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(bodies) / (time.perf_counter() - start)


async def level(http: aiohttp.ClientSession, bodies: list[bytes], rate: float, seed: int) -> dict:
    """``bodies`` at Poisson arrivals of ``rate`` per second; latency from each arrival."""
    rng, at, arrivals = random.Random(seed), 0.0, []
    for _ in bodies:
        at += rng.expovariate(rate)
        arrivals.append(at)
    samples: list[dict[str, float]] = []
    start = time.perf_counter()

    async def sample() -> None:
        while True:
            samples.append(await scrape(http))
            await asyncio.sleep(1.0)

    async def one(offset: float, body: bytes) -> tuple[int, float]:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        return await post(http, body)

    sampler = asyncio.create_task(sample())
    first = await scrape(http)
    answers = await asyncio.gather(*(one(a, b) for a, b in zip(arrivals, bodies, strict=True)))
    last = await scrape(http)
    wall = time.perf_counter() - start
    sampler.cancel()
    busy = last[SAMPLED[0]] - first[SAMPLED[0]]
    return {
        "offered_rps": rate,
        # What arrived: a few dozen Poisson arrivals stray from the rate asked for.
        "arrived_rps": len(bodies) / arrivals[-1],
        "latencies_s": sorted(seconds for status, seconds in answers if status == 200),
        "refused": sum(status == 503 for status, _ in answers),
        "failed": sum(status not in (200, 503) for status, _ in answers),
        "busy_ratio": busy / wall,
        "queue_depth_pairs": statistics.fmean(s[SAMPLED[1]] for s in samples),
        "reserved_pairs": statistics.fmean(s[SAMPLED[2]] for s in samples),
    }


async def measure(url: str, workload: Workload, args) -> dict:
    def bodies(count: int, seed: int) -> list[bytes]:
        requests = workload.requests(count, args.passages_per_request, seed)
        return [json.dumps({"query": r.query, "passages": r.passages}).encode() for r in requests]

    timeout = aiohttp.ClientTimeout(total=3600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:
        one = await idle(http, bodies(args.idle, seed=1))
        rate = await saturated(http, bodies(args.saturation_requests, seed=2), args.clients)
        print(json.dumps({"idle": one, "saturated_rps": rate}), flush=True)
        levels = []
        for i, load in enumerate(args.loads):
            row = {"load": load, **await level(http, bodies(args.requests, 10 + i), load * rate, i)}
            levels.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "latencies_s"}), flush=True)
    return {"idle": one, "saturated_rps": rate, "levels": levels}


def main() -> None:
    parser = served_workload_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="the curve's JSON")
    parser.add_argument("--passages-per-request", type=int, default=1000)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85, 1.0, 1.2])
    parser.add_argument("--requests", type=int, default=24, help="per load level")
    parser.add_argument("--idle", type=int, default=3, help="requests sent one at a time")
    parser.add_argument("--saturation-requests", type=int, default=8)
    parser.add_argument("--clients", type=int, default=2, help="closed loop, for saturation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="auto")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda with the gpu extra")
    args = parser.parse_args()

    workload = Workload(args.passages, args.queries)
    started = time.perf_counter()
    flags = ["--variant", args.variant]
    with crossrank(args.model, args.threads, flags, device=args.device) as server:
        ready_s = time.perf_counter() - started
        curve = asyncio.run(measure(server.target.url, workload, args))
    curve = {
        "model": args.model.name,
        "variant": args.variant,
        "device": args.device,
        "threads": args.threads,
        "passages_per_request": args.passages_per_request,
        "ready_s": ready_s,
        **curve,
    }
    args.out.write_text(json.dumps(curve, indent=1) + "\n")


if __name__ == "__main__":
    main()
