"""Where the engine's time goes, by operator type: onnxruntime's own profiler over one request's
pairs (length-sorted, the CPU default batch budget), per variant.

    python -m bench.op_profile --model runs/bench/default-full --variants fp32 int8 \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv --out bench/results/op-profile.md
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import onnxruntime as ort

from bench.engine_bench import make_batches
from bench.workload import Workload
from crossrank.core.scheduling import AUTO_BATCH_TOKENS
from crossrank.model.engine import CPU, plan_session
from crossrank.model.model_dir import load_model_dir
from crossrank.model.tokenization import PairTokenizer


def op_times(model_file: Path, batches: list, threads: int) -> Counter[str]:
    """Microseconds per operator type over ``batches`` (after one warm-up batch)."""
    plan = plan_session("cpu", [CPU], threads=threads)
    options = ort.SessionOptions()
    for name, value in plan.options.items():
        setattr(options, name, value)
    options.intra_op_num_threads = plan.intra_op_threads
    session = ort.InferenceSession(str(model_file), options, [CPU])
    inputs = {i.name for i in session.get_inputs()}

    def feeds(batch) -> dict:
        all_feeds = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids,
        }
        return {k: v for k, v in all_feeds.items() if k in inputs}

    session.run(None, feeds(batches[0]))
    options.enable_profiling = True
    session = ort.InferenceSession(str(model_file), options, [CPU])
    for batch in batches:
        session.run(None, feeds(batch))
    trace = Path(session.end_profiling())
    times: Counter[str] = Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--passages", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, help="markdown file for the table")
    args = parser.parse_args()
    model = load_model_dir(args.model)
    meta = model.metadata
    tokenizer = PairTokenizer(model.tokenizer_path, meta.max_query_tokens, meta.max_length)
    request = Workload(args.passages, args.queries).requests(1, args.pairs, seed=0)[0]
    budget = AUTO_BATCH_TOKENS["cpu"]
    pairs = tokenizer.encode(request.query, request.passages).pairs
    batches = make_batches(pairs, budget, sort=True)

    lines = [f"# Operator time by type ({meta.name}, {args.pairs} pairs, {budget}-token batches)"]
    for variant in args.variants:
        times = op_times(model.variant_path(variant), batches, args.threads)
        total = sum(times.values())
        lines += ["", f"## {variant}: {total / 1e6:.2f} s in operators", ""]
        lines += ["| operator | s | share |", "|---|---|---|"]
        for op, us in times.most_common(args.top):
            lines.append(f"| {op} | {us / 1e6:.2f} | {us / total:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
