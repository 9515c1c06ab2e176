"""What a latency budget gives up: nDCG@10 when each request's budget is a fraction of the time
the same request takes unbudgeted, beside BM25's and the full re-rank's.

    python -m bench.budget_curve --model models/crossrank-minilm-l6 \\
        --queries ../shared/data/trec-dl-2021/queries.tsv \\
        --qrels ../shared/data/trec-dl-2021/qrels.txt \\
        --corpus ../shared/data/trec-dl-2021/passages.jsonl.gz

One ``crossrank serve``, one client. For each judged query, its BM25 top ``--depth`` in BM25's
order is sent unbudgeted (timed: t), then with ``budget_ms`` of each fraction of t. A partial
answer is ranked as served: its scored passages by score, then the rest in BM25's order. Also
reported per fraction: the passages scored and how far past its budget an answer came.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench.systems import crossrank
from crossrank_train.evaluate import add_judged_set_flags, judged_set, measure


def ranked(results: list[dict]) -> dict[str, float]:
    """A run from an answer's order (the position is the score, so ties cannot reorder it)."""
    return {r["pid"]: float(len(results) - i) for i, r in enumerate(results)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="the model directory served")
    add_judged_set_flags(parser, depth=100)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    eval_set = judged_set(args)
    runs: dict[str, dict[str, dict[str, float]]] = {"full": {}}
    runs |= {f"{f:g}": {} for f in args.fractions}
    scored: dict[str, list[float]] = {f"{f:g}": [] for f in args.fractions}
    overrun: dict[str, list[float]] = {f"{f:g}": [] for f in args.fractions}
    server = crossrank(args.model, args.threads, ["--variant", args.variant])
    try:
        with httpx.Client(base_url=server.target.url, timeout=600) as http:
            for qid, query in eval_set.queries.items():
                pids = list(eval_set.candidates[qid])
                body = {"query": query, "passages": [eval_set.corpus[p] for p in pids]}
                began = time.perf_counter()
                full = http.post("/rerank", json=body).json()["results"]
                took = time.perf_counter() - began
                runs["full"][qid] = ranked([{"pid": pids[r["index"]]} for r in full])
                for fraction in args.fractions:
                    key = f"{fraction:g}"
                    budget_ms = max(1, round(1000 * fraction * took))
                    began = time.perf_counter()
                    answer = http.post("/rerank", json={**body, "budget_ms": budget_ms}).json()
                    overrun[key].append(time.perf_counter() - began - budget_ms / 1000)
                    results = answer["results"]
                    runs[key][qid] = ranked([{"pid": pids[r["index"]]} for r in results])
                    scored[key].append(answer["usage"]["scored"] / len(pids))
                print(f"{qid}: {took:.2f} s unbudgeted", file=sys.stderr, flush=True)
    finally:
        server.stop()
    first_stage = measure(eval_set.qrels, eval_set.candidates)["nDCG@10"]
    print(f"\n{len(eval_set.queries)} queries, {eval_set.first_stage} top {args.depth}:")
    print("| budget (of the unbudgeted time) | nDCG@10 | passages scored | late, p50 / max |")
    print("|---|---|---|---|")
    print(f"| BM25 alone | {first_stage:.4f} | 0% | — |")
    for fraction in args.fractions:
        key = f"{fraction:g}"
        ndcg = measure(eval_set.qrels, runs[key])["nDCG@10"]
        share = statistics.mean(scored[key])
        late = f"{1000 * statistics.median(overrun[key]):.0f} / {1000 * max(overrun[key]):.0f} ms"
        print(f"| {100 * fraction:g}% | {ndcg:.4f} | {100 * share:.1f}% | {late} |")
    print(f"| no budget | {measure(eval_set.qrels, runs['full'])['nDCG@10']:.4f} | 100% | — |")


if __name__ == "__main__":
    main()
