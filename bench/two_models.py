"""Two models in one process: do their engines run at once or take turns on the cores, which is
faster, and what a second model costs in memory.

    python -m bench.two_models --model models/crossrank-minilm-l6 \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv --rounds 3

The model is served three ways, each its own ``crossrank serve``: alone; twice in one process
(as ``a`` and ``b``) with ``engine_sharing: concurrent``; and twice with ``turns``. Each round
sends every server the same requests (``--clients`` clients per model, each looping over its
share of ``--requests`` requests of ``--passages-per-request`` passages; the lone model gets
both models' clients and requests), the servers in an order rotated from round to round. It
reports each server's total pairs/s and request latency (median over the rounds), per model
for the two-model ones, and each server's RSS after the load.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np

from bench.service_bench import Server, Target, closed_loop
from bench.systems import crossrank
from bench.workload import Request, Workload, served_workload_parser


async def load(targets: Sequence[Target], requests: list[Request], clients: int) -> dict:
    """Every target (a model) gets ``clients`` clients and its share of ``requests``, all at
    once; pairs/s over the whole run, and per target."""
    shares = [requests[i :: len(targets)] for i in range(len(targets))]
    began = time.perf_counter()
    results = await asyncio.gather(
        *(closed_loop(t, share, clients) for t, share in zip(targets, shares, strict=True))
    )
    seconds = time.perf_counter() - began
    pairs = sum(r.pairs for r in results)
    latencies = [x for r in results for x in r.latencies]
    return {
        "pairs_per_s": pairs / seconds,
        "per_model": [r.pairs_per_s for r in results],
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
    }


def targets(server: Server, names: Sequence[str]) -> list[Target]:
    def body(name: str):
        return lambda r: {"query": r.query, "passages": r.passages, "model": name}

    url = server.target.url
    return [Target(name, url, "/rerank", body(name)) for name in names]


def main() -> None:
    parser = served_workload_parser(__doc__)
    parser.add_argument("--variant", default="int8", help="served by every server")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--clients", type=int, default=2, help="per model")
    parser.add_argument("--requests", type=int, default=12, help="per round, in all")
    parser.add_argument("--passages-per-request", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    workload = Workload(args.passages, args.queries)
    common = ["--variant", args.variant, "--max-queued-pairs", "20000"]
    two = ["--model", f"b={args.model}"]
    servers = {
        "alone": (crossrank(args.model, args.threads, common), None),
        "concurrent": (
            crossrank(
                f"a={args.model}", args.threads, [*common, *two, "--engine-sharing", "concurrent"]
            ),
            ["a", "b"],
        ),
        "turns": (
            crossrank(
                f"a={args.model}", args.threads, [*common, *two, "--engine-sharing", "turns"]
            ),
            ["a", "b"],
        ),
    }
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for round_ in range(args.rounds):
            requests = workload.requests(args.requests, args.passages_per_request, seed=round_)
            names = list(servers)
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                server, models = servers[name]
                if models is None:
                    result = asyncio.run(load([server.target], requests, 2 * args.clients))
                else:
                    result = asyncio.run(load(targets(server, models), requests, args.clients))
                runs[name].append(result)
                print(f"round {round_} {name}: {result['pairs_per_s']:.1f} pairs/s", flush=True)
        rss = {name: server.rss_mb() for name, (server, _) in servers.items()}
    finally:
        for server, _ in servers.values():
            server.stop()
    print(f"\n{args.rounds} rounds, variant {args.variant}, {args.threads} threads (median):")
    for name, results in runs.items():
        total = statistics.median(r["pairs_per_s"] for r in results)
        p50 = statistics.median(r["p50_s"] for r in results)
        p99 = statistics.median(r["p99_s"] for r in results)
        line = f"  {name:10s} {total:6.1f} pairs/s, p50 {p50:.2f} s, p99 {p99:.2f} s"
        if results[0]["per_model"][1:]:
            per = [statistics.median(r["per_model"][i] for r in results) for i in range(2)]
            line += f" (a {per[0]:.1f}, b {per[1]:.1f} pairs/s)"
        print(line + f"; RSS {rss[name][0]:.1f} MB (peak {rss[name][1]:.1f})")


if __name__ == "__main__":
    main()
