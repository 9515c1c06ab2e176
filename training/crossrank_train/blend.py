"""Weigh the gated model's score terms against each other on a dev set.

The step-0 gated model's logit is a weighted sum of terms it computes anyway (the pooled cosine,
MaxSim with uniform or IDF query weights, exact term matching), so one forward pass over a dev
set's candidates gives every term of every pair, and any blend of them is then a sum: a grid of
weights costs no more model time than one model. The exact term matching depends on the token
ids alone, so a grid over BM25's k1 and b costs no forward pass either. ``python -m
crossrank_train.blend`` prints the grid's nDCG@10, each blend against the cosine alone (the
bi-encoder) query by query; the weights chosen go to ``python -m crossrank_train.gated_bert`` to
build the model. ``--parts`` keeps the terms in a file, so a later grid on the same set reads them
instead of running the model.

Only dev data belongs here: tuning on an eval set would make its figures meaningless.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crossrank.model.collate import PaddedBatch
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.encoding import batch_feeds, to_tensors
from crossrank_train.evaluate import (
    EvalSet,
    compare,
    format_p,
    measure,
    per_query_ndcg,
    select_eval_set,
)
from crossrank_train.gated_bert import BM25Params, GatedBertForRanking, lexical_match, segments
from crossrank_train.models import load_cross_encoder, tokenizer_file
from crossrank_train.readers import Run, read_collection
from crossrank_train.scoring import score_in_batches

NETWORK_PARTS = ("cosine", "maxsim", "maxsim_idf")
DEFAULT_BM25 = (BM25Params.k1, BM25Params.b)

# One query's terms: a column of its candidates' values per term name.
Terms = dict[str, np.ndarray]


def lexical_column(k1: float, b: float) -> str:
    return f"lexical k1={k1:g} b={b:g}"


@dataclass(frozen=True)
class Blend:
    cosine: float
    maxsim: float
    maxsim_idf: bool  # MaxSim's query tokens weighted by IDF (else uniformly)
    lexical: float
    k1: float = DEFAULT_BM25[0]
    b: float = DEFAULT_BM25[1]

    @property
    def name(self) -> str:
        terms = [f"cos {self.cosine:g}"]
        if self.maxsim:
            terms.append(f"maxsim{'(idf)' if self.maxsim_idf else ''} {self.maxsim:g}")
        if self.lexical:
            terms.append(f"lexical {self.lexical:g}")
            if (self.k1, self.b) != DEFAULT_BM25:
                terms[-1] += f" (k1 {self.k1:g}, b {self.b:g})"
        return " + ".join(terms)

    def score(self, terms: Terms) -> np.ndarray:
        score = self.cosine * terms["cosine"]
        if self.maxsim:
            score = score + self.maxsim * terms["maxsim_idf" if self.maxsim_idf else "maxsim"]
        if self.lexical:
            score = score + self.lexical * terms[lexical_column(self.k1, self.b)]
        return score


def score_parts(
    model: GatedBertForRanking,
    tokenizer: PairTokenizer,
    eval_set: EvalSet,
    bm25: list[tuple[float, float]] | None = None,
    batch_size: int = 32,
) -> dict[str, Terms]:
    """Every candidate's terms per query, in the candidates' order: the network's, and exact
    term matching for each (k1, b) of ``bm25`` (default: BM25's usual 1.2, 0.75) with the
    model's IDF table and average length."""
    if model.idf is None:
        raise ValueError("the model has no IDF table: build it with --idf-corpus/--idf-pairs")
    gates = torch.cat([layer.attention.self.cross_gate for layer in model.bert.encoder.layer])
    if gates.any() or model.classifier.weight.any():
        # A trained model's head and cross-attention are part of its score: no blend of the
        # terms alone describes it.
        raise ValueError("blend weighs the terms of a step-0 model (gates and head at 0)")
    average = model.config.lexical_avg_length
    settings = {
        lexical_column(k1, b): BM25Params(k1, b, average) for k1, b in bm25 or [DEFAULT_BM25]
    }

    def run(batch: PaddedBatch) -> np.ndarray:
        inputs = to_tensors(batch_feeds(batch, True))
        parts = model.score_parts(**inputs, every=True)
        first, second = segments(inputs["attention_mask"], inputs["token_type_ids"])
        idf = model.idf[inputs["input_ids"]] * first.float()
        columns = [parts[name].float() for name in NETWORK_PARTS] + [
            lexical_match(inputs["input_ids"], idf, second, params) for params in settings.values()
        ]
        return torch.stack(columns, dim=-1).numpy()

    names = [*NETWORK_PARTS, *settings]
    model.eval()
    found: dict[str, Terms] = {}
    with torch.inference_mode():
        for qid, query in tqdm(eval_set.queries.items(), desc="score terms", unit="query"):
            passages = [eval_set.corpus[pid] for pid in eval_set.candidates[qid]]
            if passages:
                pairs = tokenizer.encode(query, passages).pairs
                rows = score_in_batches(pairs, batch_size, run)
                found[qid] = {name: rows[:, i] for i, name in enumerate(names)}
    return found


def save_parts(path: Path, parts: dict[str, Terms], eval_set: EvalSet) -> None:
    """The terms with the query and candidate ids they belong to (``load_parts`` checks them)."""
    qids = list(parts)
    names = list(next(iter(parts.values()))) if parts else []
    np.savez_compressed(
        path,
        qids=np.array(qids),
        pids=np.array([pid for qid in qids for pid in eval_set.candidates[qid]]),
        sizes=np.array([len(eval_set.candidates[qid]) for qid in qids]),
        **{name: np.concatenate([parts[qid][name] for qid in qids]) for name in names},
    )


def load_parts(path: Path, eval_set: EvalSet) -> dict[str, Terms]:
    """Terms saved by ``save_parts`` for this very eval set (same queries, same candidates)."""
    with np.load(path) as saved:
        qids = saved["qids"].tolist()
        ends = np.cumsum(saved["sizes"])
        pids = np.split(saved["pids"], ends[:-1])
        saved_for = dict(zip(qids, (p.tolist() for p in pids), strict=True))
        if saved_for != {q: list(c) for q, c in eval_set.candidates.items() if c}:
            raise ValueError(f"{path} holds the terms of other queries or candidates")
        columns = {
            name: np.split(saved[name], ends[:-1])
            for name in saved.files
            if name not in ("qids", "pids", "sizes")
        }
    return {
        qid: {name: values[i] for name, values in columns.items()} for i, qid in enumerate(qids)
    }


def blend_run(blend: Blend, parts: dict[str, Terms], eval_set: EvalSet) -> Run:
    return {
        qid: dict(zip(eval_set.candidates[qid], map(float, blend.score(rows)), strict=True))
        for qid, rows in parts.items()
    }


def canonical(blend: Blend) -> Blend:
    """The one of the blends that score alike: MaxSim's weighting is moot without MaxSim, and
    BM25's parameters without the lexical term."""
    k1, b = (blend.k1, blend.b) if blend.lexical else DEFAULT_BM25
    return replace(blend, maxsim_idf=blend.maxsim_idf and bool(blend.maxsim), k1=k1, b=b)


def grid(
    cosine: float,
    maxsim: list[float],
    lexical: list[float],
    bm25: list[tuple[float, float]] | None = None,
) -> list[Blend]:
    settings = bm25 or [DEFAULT_BM25]
    blends = [
        Blend(cosine, m, idf, lex, k1, b)
        for m, idf, lex, (k1, b) in product(maxsim, (False, True), lexical, settings)
    ]
    return list(dict.fromkeys(map(canonical, blends)))


def evaluate_blends(
    blends: list[Blend], parts: dict[str, Terms], eval_set: EvalSet
) -> list[dict[str, object]]:
    """nDCG@10, MRR@10, R@100 of every blend, and its nDCG@10 against the cosine alone."""
    baseline = per_query_ndcg(eval_set.qrels, blend_run(Blend(1, 0, False, 0), parts, eval_set))
    rows: list[dict[str, object]] = []
    for blend in tqdm(blends, desc="blends"):
        run = blend_run(blend, parts, eval_set)
        versus = compare(
            blend.name,
            per_query_ndcg(eval_set.qrels, run),
            "cosine",
            baseline,
            eval_set.qrels,
        )
        rows.append(
            {
                "blend": asdict(blend),
                "name": blend.name,
                **measure(eval_set.qrels, run),
                "vs_cosine": versus.as_record(),
            }
        )
    return rows


def combine(results: list[Path]) -> list[tuple[str, float, list[float]]]:
    """Blends measured on every one of several dev sets (``--out`` files), best mean nDCG@10
    first: (name, mean, one figure per file)."""
    per_set = [
        {row["name"]: row["nDCG@10"] for row in json.loads(path.read_text())["blends"]}
        for path in results
    ]
    table = []
    for name in per_set[0]:
        if all(name in figures for figures in per_set):
            figures = [f[name] for f in per_set]
            table.append((name, float(np.mean(figures)), figures))
    return sorted(table, key=lambda row: row[1], reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossrank_train.blend", description=__doc__)
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        help="rank the blends of these --out files by their mean nDCG@10 (and run nothing)",
    )
    parser.add_argument("--model", type=Path, help="gated checkpoint with an IDF table")
    parser.add_argument("--queries", type=Path)
    parser.add_argument("--qrels", type=Path)
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--pairs", type=Path, help="query/positives/negatives JSONL(.gz)")
    parser.add_argument("--wikiqa", type=Path, help="WikiQA TSV")
    parser.add_argument("--depth", type=int, default=30, help="BM25 candidates per query")
    parser.add_argument("--max-queries", type=int, help="the first N judged queries")
    parser.add_argument("--max-length", type=int, default=256, help="pair tokens, as served")
    parser.add_argument("--cosine", type=float, default=10.0, help="weight of the cosine")
    parser.add_argument("--maxsim", type=float, nargs="+", default=[0.0, 5.0, 10.0, 20.0])
    parser.add_argument("--lexical", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--k1", type=float, nargs="+", default=[DEFAULT_BM25[0]], help="BM25's k1")
    parser.add_argument("--b", type=float, nargs="+", default=[DEFAULT_BM25[1]], help="BM25's b")
    parser.add_argument(
        "--parts",
        type=Path,
        help="NPZ file of the terms: read if it exists (no model run), else written",
    )
    parser.add_argument("--out", type=Path, help="JSON file for every blend's figures")
    args = parser.parse_args(argv)
    if args.combine:
        print("mean    " + "  ".join(f"{path.stem:>10.10}" for path in args.combine) + "  blend")
        for name, mean, figures in combine(args.combine):
            print(f"{mean:.4f}  " + "  ".join(f"{f:>10.4f}" for f in figures) + f"  {name}")
        return 0
    if args.model is None and not (args.parts and args.parts.exists()):
        parser.error("give --model, or --parts saved by an earlier run (or --combine)")
    sources = {k: getattr(args, k) for k in ("queries", "qrels", "corpus", "pairs", "wikiqa")}
    try:
        collection = read_collection(**sources)
    except ValueError as error:
        parser.error(str(error))
    eval_set = select_eval_set(collection, depth=args.depth, max_queries=args.max_queries)
    bm25 = list(product(args.k1, args.b))
    if args.parts and args.parts.exists():
        try:
            parts = load_parts(args.parts, eval_set)
        except ValueError as error:
            parser.error(str(error))
        saved = set(next(iter(parts.values()), {}))
        missing = sorted({lexical_column(k1, b) for k1, b in bm25} - saved)
        if missing:
            parser.error(f"{args.parts} has no {', '.join(missing)}: score them again (--model)")
    else:
        model = load_cross_encoder(args.model)
        if not isinstance(model, GatedBertForRanking):
            parser.error(f"{args.model} is no gated model (crossrank_train.gated_bert/_mpnet)")
        tokenizer = PairTokenizer(tokenizer_file(args.model), 64, args.max_length)
        parts = score_parts(model, tokenizer, eval_set, bm25)
        if args.parts:
            save_parts(args.parts, parts, eval_set)
    rows = evaluate_blends(grid(args.cosine, args.maxsim, args.lexical, bm25), parts, eval_set)
    rows.sort(key=lambda row: row["nDCG@10"], reverse=True)  # type: ignore[arg-type,return-value]
    first = measure(eval_set.qrels, eval_set.candidates)["nDCG@10"]
    print(f"{len(eval_set.queries)} queries, top {args.depth} of {eval_set.first_stage}")
    print(f"{eval_set.first_stage}: nDCG@10 {first:.4f}")
    for row in rows:
        versus = row["vs_cosine"]
        print(
            f"{row['nDCG@10']:.4f}  {row['name']:<40} vs cosine {versus['delta']:+.4f} "  # type: ignore[index]
            f"p {format_p(versus['p_value'])}"  # type: ignore[index]
        )
    if args.out:
        record = {"queries": len(eval_set.queries), "depth": args.depth, "first_stage": first}
        args.out.write_text(json.dumps({**record, "blends": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
