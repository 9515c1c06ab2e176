"""What keeping some MatMuls in fp32 buys the int8 variant: ranking agreement with fp32 on a dev
set, scored as the CPU service batches. Only agreement: what the kept MatMuls cost in speed is
for the engine benchmark (``bench.run``) to measure, in one run beside the shipped int8.

    python -m bench.int8_exclusions --model runs/bench/default-full \\
        --queries ../shared/data/nfcorpus/dev.titles.preprocessed.queries.tsv \\
        --qrels ../shared/data/nfcorpus/qrels/dev.tsv \\
        --corpus ../shared/data/nfcorpus/corpus_preprocessed.jsonl.gz \\
        --max-queries 100 --out bench/results/int8-exclusions.md

``--model`` is a model directory that keeps its fp32 graph (``crossrank export --variants fp32
int8``); each variant quantises that graph as ``crossrank export`` does, minus the excluded nodes.
A dev set, not an eval set: this picks how the export quantises.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from crossrank.model.model_dir import load_model_dir
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.agreement import Agreement, cases_from_eval_set, ranking_agreement
from crossrank_train.evaluate import load_eval_set
from crossrank_train.export import quantize_int8
from crossrank_train.scoring import OnnxScorer, served_limits

FFN_OUTPUT = re.compile(r"layer\.\d+/output/dense/")  # not attention/output/dense


def layer(name: str) -> int:
    """The encoder layer a node belongs to (onnx node names keep the torch module path)."""
    found = re.search(r"layer\.(\d+)/", name)
    return int(found.group(1)) if found else -1


# Which linear MatMuls each variant keeps in fp32, given a node's name and the last layer's index.
VARIANTS: dict[str, Callable[[str, int], bool]] = {
    "all MatMuls int8 (shipped)": lambda name, last: False,
    "FFN output MatMuls fp32": lambda name, last: bool(FFN_OUTPUT.search(name)),
    "first layer fp32": lambda name, last: layer(name) == 0,
    "last layer fp32": lambda name, last: layer(name) == last,
    "first layer and FFN outputs fp32": lambda name, last: (
        layer(name) == 0 or bool(FFN_OUTPUT.search(name))
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--max-queries", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    eval_set = load_eval_set(
        queries=args.queries,
        qrels=args.qrels,
        corpus=args.corpus,
        pairs=None,
        wikiqa=None,
        run=None,
        depth=args.depth,
        max_queries=args.max_queries,
        grade_map=None,
    )
    cases = cases_from_eval_set(eval_set)
    model = load_model_dir(args.model)
    fp32 = model.variant_path("fp32")
    meta = model.metadata
    tokenizer = PairTokenizer(model.tokenizer_path, meta.max_query_tokens, meta.max_length)

    def score(model_file: Path) -> list:
        scorer = OnnxScorer(model_file, tokenizer, served_limits())
        return [scorer.score(case.query, case.passages) for case in cases]

    reference = score(fp32)
    graph = onnx.load(str(fp32)).graph
    weights = {t.name for t in graph.initializer}
    # The MatMuls int8 quantises: those with a weight (the attention's own MatMuls stay fp32).
    linear = [n.name for n in graph.node if n.op_type == "MatMul" and weights & set(n.input)]
    last = max(layer(name) for name in linear)
    rows: list[tuple[str, int, Agreement]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kept in VARIANTS.items():
            target = Path(tmp) / "int8.onnx"
            nodes = [m for m in linear if kept(m, last)]
            quantize_int8(fp32, target, exclude=nodes)
            rows.append((name, len(nodes), ranking_agreement(reference, score(target))))
            print(f"{name}: {rows[-1][2]}", flush=True)

    pairs = sum(len(case.passages) for case in cases)
    lines = [
        f"int8 variants of `{args.model}` vs its fp32 graph on {len(cases)} queries of "
        f"{args.queries.name} (BM25 top {args.depth}, {pairs} pairs), scored in the CPU "
        f"service's batches. The encoder has {len(linear)} linear MatMuls.",
        "",
        "| variant | linear MatMuls kept fp32 | top-10 overlap | Kendall tau | worst tau |",
        "|---|---|---|---|---|",
    ]
    for name, kept_fp32, agreement in rows:
        lines.append(
            f"| {name} | {kept_fp32} | {agreement.top10_overlap:.3f} | {agreement.kendall_tau:.3f} "
            f"| {agreement.worst_kendall_tau:.3f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
