"""Each CPU variant of a model directory on this CPU: engine pairs/s, ranking agreement with the
float reference, and what ``variant: auto`` chooses here.

    python -m bench.variant_speed --model runs/bench/minilm-l6-ce-onnx \\
        --queries ../shared/data/trec-dl-2021/queries.tsv \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --run ../shared/data/trec-dl-2021/runs/BM25.top100.run --out bench/results/variants.md

Variants: those in the directory (fp32, int8, fp16) and fp32 rebuilt from fp16 when the directory
has fp16 (crossrank.model.fp32_rebuild). Each query's BM25 candidates are scored as the CPU service
batches a request (length-sorted, at most 1,024 padded tokens a batch). Agreement is against
fp32 when the directory has it, else against the rebuilt fp32. Speed: ``--rounds`` passes over
the first ``--time-queries`` queries, the variants taking turns in each round (so a change in
the shared machine's load falls on all), median per variant.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.engine_bench import make_batches
from bench.ranking_agreement import ranking_agreement
from bench.run import machine
from crossrank.core.scheduling import AUTO_BATCH_TOKENS
from crossrank.core.served import warmup_batches
from crossrank.model.engine import Engine, OnnxEngine, plan_session
from crossrank.model.fp32_rebuild import FP32_FROM_FP16
from crossrank.model.model_dir import load_model_dir
from crossrank.model.tokenization import EncodedPair, load_pair_encoder
from crossrank.model.variant_choice import INT8_FLAGS, load_variant, model_source, read_cpu_flags

ORDER = ("fp32", FP32_FROM_FP16, "fp16", "int8")


def read_cases(
    queries: Path, passages: Path, run: Path, max_queries: int
) -> list[tuple[str, list[str]]]:
    """(query, its candidates in run order) for the first ``max_queries`` queries of the run."""
    texts = dict(line.rstrip("\n").split("\t", 1) for line in queries.open() if line.strip())
    ranked: dict[str, list[str]] = defaultdict(list)
    for line in run.open():
        qid, _, doc, *_ = line.split()
        ranked[qid].append(doc)
    chosen = [qid for qid in ranked if qid in texts][:max_queries]
    wanted = {doc for qid in chosen for doc in ranked[qid]}
    bodies = {}
    with gzip.open(passages, "rt") as f:
        for line in f:
            record = json.loads(line)
            if record["_id"] in wanted:
                bodies[record["_id"]] = record["text"]
    return [(texts[qid], [bodies[d] for d in ranked[qid] if d in bodies]) for qid in chosen]


def score(engine: Engine, pairs: list[EncodedPair], batch_tokens: int) -> np.ndarray:
    """Scores in the pairs' order, computed in the service's length-sorted batches."""
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].length)
    logits = np.concatenate(
        [engine.run(b) for b in make_batches([pairs[i] for i in order], batch_tokens, False)]
    )
    out = np.empty(len(pairs), dtype=np.float32)
    out[order] = logits
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--passages", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="TREC run: the candidates")
    parser.add_argument("--max-queries", type=int, default=20, help="for the agreement")
    parser.add_argument("--time-queries", type=int, default=5, help="for the speed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("bench/results/variants.md"))
    args = parser.parse_args()

    model = load_model_dir(args.model)
    present = set(model.metadata.variants)
    variants = [v for v in ORDER if v in present or (v == FP32_FROM_FP16 and "fp16" in present)]
    plan = plan_session("cpu", ["CPUExecutionProvider"], threads=args.threads)
    batch_tokens = AUTO_BATCH_TOKENS["cpu"]
    tokenizer = load_pair_encoder(model)
    cases = read_cases(args.queries, args.passages, args.run, args.max_queries)
    pairs = [tokenizer.encode(query, passages).pairs for query, passages in cases]
    engines = {v: OnnxEngine(model_source(model, v), plan) for v in variants}

    scores = {v: [score(engine, p, batch_tokens) for p in pairs] for v, engine in engines.items()}
    timed = pairs[: args.time_queries]
    count = sum(len(p) for p in timed)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for v in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
            start = time.perf_counter()
            for p in timed:
                score(engines[v], p, batch_tokens)
            seconds[v].append(time.perf_counter() - start)
    speed = {v: count / statistics.median(s) for v, s in seconds.items()}

    reference = "fp32" if "fp32" in present else FP32_FROM_FP16
    flags = read_cpu_flags()
    probe = tokenizer.encode("warm up", ["the engine answers"]).pairs[0]
    batches = warmup_batches(probe, model.metadata.max_length, batch_tokens, 256)
    choice, _ = load_variant(model, "auto", plan, OnnxEngine, batches, flags)

    lines = [
        f"# CPU variants of {model.metadata.name} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Machine: {machine()}; int8 instructions: "
        f"{', '.join(sorted(INT8_FLAGS & flags)) or 'none'}; {args.threads} threads. "
        f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f}.",
        f"Speed: {len(timed)} queries ({count} pairs), median of {args.rounds} interleaved "
        f"rounds. Agreement: {len(cases)} queries of {args.queries.name}, the candidates of "
        f"{args.run.name}, against {reference}.",
        "",
        f"| variant | pairs/s | / {reference} | top-10 overlap | worst | Kendall τ | max abs Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        a = ranking_agreement(scores[reference], scores[v])
        lines.append(
            f"| {v} | {speed[v]:.1f} | {speed[v] / speed[reference]:.2f}x | "
            f"{a.top10_overlap:.3f} | {a.worst_top10_overlap:.1f} | {a.kendall_tau:.4f} | "
            f"{a.max_abs_diff:.2g} |"
        )
    lines += [
        "",
        f"`variant: auto` here: **{choice.variant}**, by {choice.basis} ({choice.detail}).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
