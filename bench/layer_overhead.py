"""What the service costs over the bare engine, and what rendering an answer costs, with an
earlier checkout served beside this one for a before/after in one run.

    python -m bench.layer_overhead --model models/crossrank-minilm-l6 \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv \\
        --baseline /tmp/crossrank-before/service --rounds 3

Each round takes, in an order rotated from round to round so that drift in the machine's speed
falls on all alike: the bare engine (``OnnxEngine`` on the pre-tokenised pairs, length-sorted
and cut into batches of the service's CPU budget, the variant the server chose) and every
server at 1 x 1,000 passages and at 4 x 250 (four clients at once). A server's figure is its
pairs/s over the bare engine's pairs/s on the same pairs in the same round; the medians over the
rounds are printed, and this checkout's figure over the baseline's, round by round (the two run
back to back, so drift between rounds cancels). ``--baseline`` is the ``service/`` folder of
another checkout (``git worktree add``), served by the same interpreter with it first on
``PYTHONPATH``. Every server and the bare engine run ``--variant`` (int8 by default).

Rendering: a 1,000-result ``/rerank`` answer built as the routes build it (response models,
pydantic's serialiser) and as plain dicts through orjson, timed over ``--render-repeats`` and
set against the 1 x 1,000 request's median time.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from bench.service_bench import Server, closed_loop
from bench.workload import Request, Workload, served_workload_parser
from crossrank.core.scheduling import AUTO_BATCH_TOKENS
from crossrank.http.schemas import RerankResponse, RerankResult, Usage
from crossrank.model.collate import pad_pairs
from crossrank.model.engine import CPU, OnnxEngine, plan_session
from crossrank.model.model_dir import load_model_dir
from crossrank.model.tokenization import load_pair_encoder
from crossrank.model.variant_choice import model_source

MAX_BATCH_PAIRS = 128  # the service's default


def bare_engine(model_dir: Path, variant: str, threads: int) -> Callable[[list[Request]], float]:
    """A function timing the bare engine (seconds) over the requests' pre-tokenised pairs."""
    model = load_model_dir(model_dir)
    engine = OnnxEngine(model_source(model, variant), plan_session("cpu", [CPU], threads=threads))
    encoder = load_pair_encoder(model)
    budget = AUTO_BATCH_TOKENS["cpu"]

    def run(requests: list[Request]) -> float:
        pairs = [p for r in requests for p in encoder.encode(r.query, r.passages).pairs]
        pairs.sort(key=lambda p: -p.length)
        batches, start = [], 0
        while start < len(pairs):
            fit = max(1, min(MAX_BATCH_PAIRS, budget // pairs[start].length))
            batches.append(pad_pairs(pairs[start : start + fit]))
            start += fit
        began = time.perf_counter()
        for batch in batches:
            engine.run(batch)
        return time.perf_counter() - began

    return run


def crossrank_server(
    name: str, model: Path, variant: str, threads: int, service_dir: Path | None
) -> Server:
    env = {"PYTHONPATH": str(service_dir)} if service_dir else {}
    command = [sys.executable, "-m", "crossrank.cli", "serve", "--model", str(model)]
    command += ["--variant", variant, "--threads", str(threads), "--port"]
    return Server(
        name,
        command,
        rerank_path="/rerank",
        body=lambda r: {"query": r.query, "passages": r.passages},
        ready_path="/ready",
        env=env,
        log=Path(f"/tmp/layer-overhead-{name}.log"),
    )


def render_seconds(repeats: int) -> tuple[float, float]:
    """Median seconds to render a 1,000-result answer: response models, and plain dicts."""
    rng = np.random.default_rng(0)
    best = [
        (int(i), float(s)) for i, s in zip(rng.permutation(1000), rng.random(1000), strict=True)
    ]
    usage = {"pairs": 1000, "chunks": 1000, "tokens": 76_000, "truncated": 0}

    def models() -> bytes:
        results = [RerankResult(index=i, score=s, passage=None, span=None) for i, s in best]
        body = RerankResponse(results=results, model="m", usage=Usage(**usage))
        return body.model_dump_json(exclude_none=True).encode()

    def dicts() -> bytes:
        results = [{"index": i, "score": s} for i, s in best]
        return orjson.dumps({"results": results, "model": "m", "usage": usage})

    assert orjson.loads(models()) == orjson.loads(dicts())
    timings: dict[str, list[float]] = {"models": [], "dicts": []}
    for _ in range(repeats):
        for name, render in (("models", models), ("dicts", dicts)):
            began = time.perf_counter()
            render()
            timings[name].append(time.perf_counter() - began)
    return statistics.median(timings["models"]), statistics.median(timings["dicts"])


def main() -> None:
    parser = served_workload_parser(__doc__)
    parser.add_argument("--baseline", type=Path, help="another checkout's service/ folder")
    parser.add_argument(
        "--variant",
        default="int8",
        help="served by every server and the bare engine (auto's start-up probe could pick "
        "differently in each)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--render-repeats", type=int, default=50)
    args = parser.parse_args()

    workload = Workload(args.passages, args.queries)
    servers = [crossrank_server("this", args.model, args.variant, args.threads, None)]
    if args.baseline:
        servers.append(
            crossrank_server("baseline", args.model, args.variant, args.threads, args.baseline)
        )
    try:
        bare = bare_engine(args.model, args.variant, args.threads)
        bare(workload.requests(1, 200, seed=-1))  # warm: every batch shape met once
        shapes = {"1 x 1000": (1, 1000), "4 x 250": (4, 250)}
        ratios: dict[tuple[str, str], list[float]] = {}
        seconds: dict[str, list[float]] = {s.target.name: [] for s in servers}
        for round_ in range(args.rounds):
            for shape, (clients, size) in shapes.items():
                requests = workload.requests(clients, size, seed=round_)
                order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
                bare_pairs_per_s = clients * size / bare(requests)
                for server in order:
                    result = asyncio.run(closed_loop(server.target, requests, clients))
                    name = server.target.name
                    ratios.setdefault((name, shape), []).append(
                        result.pairs_per_s / bare_pairs_per_s
                    )
                    if clients == 1:
                        seconds[name].append(result.seconds)
                    print(
                        f"round {round_} {shape} {name}: {result.pairs_per_s:.1f} pairs/s, "
                        f"bare {bare_pairs_per_s:.1f}, ratio {ratios[(name, shape)][-1]:.3f}",
                        flush=True,
                    )
    finally:
        for server in servers:
            server.stop()
    print(f"\nvariant {args.variant}, {args.threads} threads, {args.rounds} rounds (median):")
    for (name, shape), values in sorted(ratios.items()):
        spread = f"{min(values):.3f}-{max(values):.3f}"
        print(
            f"  {name:9s} {shape:9s} {statistics.median(values):.3f} of the bare engine ({spread})"
        )
    if args.baseline:
        for shape in shapes:
            pairs = zip(ratios[("this", shape)], ratios[("baseline", shape)], strict=True)
            paired = [this / before for this, before in pairs]
            spread = f"{min(paired):.3f}-{max(paired):.3f}"
            print(f"  this / baseline {shape:9s} {statistics.median(paired):.3f} ({spread})")
    as_models, as_dicts = render_seconds(args.render_repeats)
    request_s = statistics.median(seconds["this"])
    print(
        f"rendering 1,000 results: response models {1000 * as_models:.2f} ms, dicts + orjson "
        f"{1000 * as_dicts:.2f} ms; models = {100 * as_models / request_s:.3f}% of a "
        f"1,000-passage request ({request_s:.1f} s)"
    )


if __name__ == "__main__":
    main()
