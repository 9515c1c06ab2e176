"""Budget kept: how many budgeted answers arrive within their budget plus one batch, as clients
are added.

For each ``--clients`` count, that many clients each send ``--requests`` requests of
``--passages`` passages with ``budget_ms`` = ``--budget-ms``, one after another, at a fresh
``crossrank serve``. It reports the share of answers within the budget, and within the budget
plus one batch (the server's mean batch time, from its crossrank_batch_inference_seconds), the
p50 / p99 / max lateness past the budget, and the mean share of passages scored.

    .venv/bin/python -m bench.budget_kept --model models/crossrank-minilm-l6 \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.systems import crossrank
from bench.workload import Workload, served_workload_parser


def mean_batch_seconds(metrics_text: str) -> float:
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "crossrank_batch_inference_seconds_sum":
                total += sample.value
            elif sample.name == "crossrank_batch_inference_seconds_count":
                count += sample.value
    return total / count


async def clients(url: str, bodies: list[list[bytes]]) -> list[tuple[float, float]]:
    """Each list of ``bodies`` sent by its own client, one after another: (seconds, share of
    passages scored) per answer."""
    timeout = aiohttp.ClientTimeout(total=600)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(url, timeout=timeout) as http:

        async def client(own: list[bytes]) -> list[tuple[float, float]]:
            answers = []
            for body in own:
                sent = time.perf_counter()
                async with http.post("/rerank", data=body, headers=headers) as response:
                    answer = await response.json()
                    assert response.status == 200, answer
                seconds = time.perf_counter() - sent
                usage = answer["usage"]
                answers.append((seconds, usage["scored"] / usage["pairs"]))
            return answers

        per_client = await asyncio.gather(*(client(own) for own in bodies))
    return [a for answers in per_client for a in answers]


def main() -> None:
    parser = served_workload_parser(__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--passages-per-request", type=int, default=100)
    parser.add_argument("--budget-ms", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="int8")
    args = parser.parse_args()

    workload = Workload(args.passages, args.queries)
    budget_s = args.budget_ms / 1000
    rows = []
    for count in args.clients:
        bodies = [
            [
                json.dumps(
                    {"query": r.query, "passages": r.passages, "budget_ms": args.budget_ms}
                ).encode()
                for r in workload.requests(args.requests, args.passages_per_request, seed)
            ]
            for seed in range(count)
        ]
        with crossrank(args.model, args.threads, ["--variant", args.variant]) as server:
            answers = asyncio.run(clients(server.target.url, bodies))
            batch_s = mean_batch_seconds(httpx.get(server.target.url + "/metrics").text)
        late = np.array([seconds - budget_s for seconds, _ in answers])
        rows.append(
            {
                "clients": count,
                "answers": len(answers),
                "within_budget": round(float(np.mean(late <= 0)), 3),
                "within_budget_plus_one_batch": round(float(np.mean(late <= batch_s)), 3),
                "mean_batch_ms": round(1000 * batch_s, 1),
                "late_ms_p50_p99_max": [
                    round(1000 * float(np.percentile(late, q)), 1) for q in (50, 99, 100)
                ],
                "scored_share_mean": round(float(np.mean([s for _, s in answers])), 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
