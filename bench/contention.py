"""Contention: the latency of one client's small interactive requests while others load the server.

One ``crossrank serve`` with four API keys. A probe client (key 0) sends ``--probe-passages``
passage requests one after another, ``--probes`` of them, in each scenario:

* ``idle``: nothing else runs;
* ``batch``: ``--flooders`` clients loop ``--flood-passages`` passage requests at batch
  priority (one key: batch work filling the server);
* ``keys_valid``: as many clients, one per other key, loop the same requests at interactive
  priority (three keys flooding);
* ``keys_invalid``: the same bodies made invalid (the last passage empty: a 422 after the body
  is counted and parsed).

It reports, per scenario, the probe's p50 / p99 / max seconds and p99 over the idle p99, and
the flooders' answers by status. Bodies are encoded before the clock starts.

    .venv/bin/python -m bench.contention --model models/crossrank-minilm-l6 \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np

from bench.systems import crossrank
from bench.workload import Workload, served_workload_parser

KEYS = [f"contention-bench-key-{i}" for i in range(4)]
SCENARIOS = ("idle", "batch", "keys_valid", "keys_invalid")


def auth(key: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}", "Content-Type": "application/json"}


async def flood(
    http: aiohttp.ClientSession, bodies: list[bytes], key: int, priority: str, stop: asyncio.Event
) -> Counter[int]:
    """Send ``bodies`` in a loop until ``stop``; the answers' statuses. A refusal is retried
    after its Retry-After, as a well-behaved client does."""
    statuses: Counter[int] = Counter()
    headers = {**auth(key), "X-Crossrank-Priority": priority}
    for body in itertools.cycle(bodies):
        if stop.is_set():
            return statuses
        async with http.post("/rerank", data=body, headers=headers) as response:
            await response.read()
            statuses[response.status] += 1
            if response.status in (429, 503):
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
    return statuses


async def scenario(
    url: str, name: str, probes: list[bytes], floods: list[bytes], flooders: int
) -> dict:
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(url, timeout=timeout) as http:
        stop = asyncio.Event()
        tasks = []
        if name != "idle":
            for i in range(flooders):
                key = 1 if name == "batch" else 1 + i % 3
                priority = "batch" if name == "batch" else "interactive"
                tasks.append(asyncio.create_task(flood(http, floods, key, priority, stop)))
            await asyncio.sleep(5.0)  # the flood fills the queue first
        seconds = []
        for body in probes:
            sent = time.perf_counter()
            async with http.post("/rerank", data=body, headers=auth(0)) as response:
                await response.read()
                assert response.status == 200, (name, response.status, await response.text())
            seconds.append(time.perf_counter() - sent)
        stop.set()
        statuses = sum((await asyncio.gather(*tasks)), Counter())
    return {
        "probe_p50_s": round(float(np.percentile(seconds, 50)), 3),
        "probe_p99_s": round(float(np.percentile(seconds, 99)), 3),
        "probe_max_s": round(max(seconds), 3),
        "flood_statuses": dict(sorted(statuses.items())),
    }


def main() -> None:
    parser = served_workload_parser(__doc__)
    parser.add_argument("--probes", type=int, default=60)
    parser.add_argument("--probe-passages", type=int, default=50)
    parser.add_argument("--flood-passages", type=int, default=1000)
    parser.add_argument("--flooders", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--server-log", type=Path, help="the server's log (access lines)")
    args = parser.parse_args()

    workload = Workload(args.passages, args.queries)

    def bodies(count: int, passages: int, seed: int, invalid: bool = False) -> list[bytes]:
        encoded = []
        for r in workload.requests(count, passages, seed):
            texts = [*r.passages[:-1], ""] if invalid else r.passages
            encoded.append(json.dumps({"query": r.query, "passages": texts}).encode())
        return encoded

    probes = bodies(args.probes, args.probe_passages, 0)
    floods = {
        False: bodies(8, args.flood_passages, 1),
        True: bodies(8, args.flood_passages, 1, True),
    }
    flags = ["--variant", args.variant, "--api-keys", ",".join(KEYS)]
    results = {}
    with crossrank(args.model, args.threads, flags, log=args.server_log) as server:
        for name in args.scenarios:
            flood_bodies = floods[name == "keys_invalid"]
            results[name] = asyncio.run(
                scenario(server.target.url, name, probes, flood_bodies, args.flooders)
            )
    idle = results.get("idle", {}).get("probe_p99_s")
    for result in results.values():
        if idle:
            result["p99_over_idle"] = round(result["probe_p99_s"] / idle, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
