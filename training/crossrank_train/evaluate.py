"""Re-ranking evaluation: score a first stage's candidates, measure with ir-measures.

The first stage is a TREC run read from a file or BM25 computed on the fly over the corpus;
its own figures are reported beside every re-ranker's, and every two systems are compared query by
query (nDCG@10, paired t-test): with 50-odd queries a difference of 0.01 is often noise.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from itertools import combinations, islice
from pathlib import Path

import ir_measures
import numpy as np
from ir_measures import RR, R, nDCG
from scipy.stats import ttest_rel
from tqdm import tqdm

from crossrank_train.bm25 import Bm25Index
from crossrank_train.readers import (
    Collection,
    Qrels,
    Run,
    read_collection,
    read_run,
)
from crossrank_train.scoring import Scorer

log = logging.getLogger(__name__)

MEASURES = [nDCG @ 10, RR @ 10, R @ 100]
MEASURE_NAMES = [str(m) for m in MEASURES]


@dataclass
class EvalSet:
    queries: dict[str, str]  # only the evaluated ones
    corpus: dict[str, str]
    qrels: Qrels
    candidates: Run  # the first stage, at most `depth` passages a query
    first_stage: str  # its name in reports


def _top(scores: dict[str, float], depth: int) -> dict[str, float]:
    return dict(sorted(scores.items(), key=lambda item: item[1], reverse=True)[:depth])


def load_eval_set(
    *,
    queries: str | Path | None = None,
    qrels: str | Path | None = None,
    corpus: str | Path | None = None,
    pairs: str | Path | None = None,
    wikiqa: str | Path | None = None,
    run: str | Path | None = None,
    depth: int = 100,
    max_queries: int | None = None,
    grade_map: dict[int, int] | None = None,
) -> EvalSet:
    """``select_eval_set`` over files: any source ``read_collection`` takes, optionally with a
    TREC run as the first stage."""
    collection = read_collection(
        queries=queries, qrels=qrels, corpus=corpus, pairs=pairs, wikiqa=wikiqa, grade_map=grade_map
    )
    first_stage = (read_run(run), Path(run).stem) if run is not None else None
    return select_eval_set(collection, first_stage, depth=depth, max_queries=max_queries)


def add_judged_set_flags(parser: argparse.ArgumentParser, depth: int) -> None:
    """--queries, --qrels and --corpus of a judged set, with BM25's --depth candidates a query
    for the first --max-queries judged queries (:func:`judged_set` reads them)."""
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--depth", type=int, default=depth, help="BM25 candidates per query")
    parser.add_argument("--max-queries", type=int, help="the first N judged queries")


def judged_set(args: argparse.Namespace) -> EvalSet:
    return load_eval_set(
        queries=args.queries,
        qrels=args.qrels,
        corpus=args.corpus,
        depth=args.depth,
        max_queries=args.max_queries,
    )


def select_eval_set(
    collection: Collection,
    first_stage: tuple[Run, str] | None = None,
    *,
    depth: int = 100,
    max_queries: int | None = None,
) -> EvalSet:
    """The queries with at least one relevant judgement (in the collection's order, the first
    ``max_queries`` of them), their qrels, and their top-``depth`` candidates from
    ``first_stage`` (a run and its name) or else BM25 over the corpus."""
    all_qrels, passages = collection.qrels, collection.corpus
    judged = (
        qid for qid in collection.queries if any(g > 0 for g in all_qrels.get(qid, {}).values())
    )
    chosen = {qid: collection.queries[qid] for qid in islice(judged, max_queries)}
    if first_stage is not None:
        full_run, name = first_stage
        candidates = {qid: _top(full_run.get(qid, {}), depth) for qid in chosen}
    else:
        candidates = Bm25Index(passages).search(chosen, depth)
        name = "BM25 (bm25s)"
    missing = sum(pid not in passages for ranked in candidates.values() for pid in ranked)
    if missing:
        log.warning("%d candidates have no text in the corpus and are left out", missing)
        candidates = {
            qid: {pid: s for pid, s in ranked.items() if pid in passages}
            for qid, ranked in candidates.items()
        }
    return EvalSet(chosen, passages, {q: all_qrels[q] for q in chosen}, candidates, name)


def measure(qrels: Qrels, run: Run) -> dict[str, float]:
    """nDCG@10, RR@10 (MRR@10 averaged over queries) and R@100."""
    results = ir_measures.calc_aggregate(MEASURES, qrels, run)
    return {str(m): float(results[m]) for m in MEASURES}


def rerank(scorer: Scorer, eval_set: EvalSet) -> Run:
    reranked: Run = {}
    for qid, query in tqdm(eval_set.queries.items(), desc=f"re-ranking {scorer.name}"):
        pids = list(eval_set.candidates[qid])
        scores = scorer.score(query, [eval_set.corpus[p] for p in pids]) if pids else []
        reranked[qid] = {pid: float(s) for pid, s in zip(pids, scores, strict=True)}
    return reranked


def format_p(p_value: float | None) -> str:
    return "n/a (one query)" if p_value is None else f"{p_value:.3g}"


@dataclass
class Comparison:
    system: str
    baseline: str
    delta: float  # mean nDCG@10 difference, system minus baseline
    # Two-sided paired t-test over the queries; 1.0 if none differs, None with one query (no
    # spread to test against: 1.0 would claim "no evidence" where there is no test at all).
    p_value: float | None
    wins: int  # queries where the system scores higher
    losses: int

    def as_record(self) -> dict[str, float | int | str | None]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Evaluation:
    rows: list[dict[str, float | str]]  # the first stage, then one per scorer
    comparisons: list[Comparison]  # every later system against every earlier one


def per_query_ndcg(qrels: Qrels, run: Run) -> dict[str, float]:
    """nDCG@10 of every judged query (0 where the run has nothing for it)."""
    return {m.query_id: float(m.value) for m in ir_measures.iter_calc([nDCG @ 10], qrels, run)}


def compare(
    system: str, ours: dict[str, float], baseline: str, theirs: dict[str, float], qrels: Qrels
) -> Comparison:
    """``system`` against ``baseline`` from their per-query nDCG@10 (``per_query_ndcg``)."""
    queries = sorted(qrels)
    a = np.array([ours.get(q, 0.0) for q in queries])
    b = np.array([theirs.get(q, 0.0) for q in queries])
    p_value: float | None = None
    if len(queries) > 1:
        p_value = float(ttest_rel(a, b).pvalue) if np.any(a != b) else 1.0
    return Comparison(
        system, baseline, float(np.mean(a - b)), p_value, int(np.sum(a > b)), int(np.sum(a < b))
    )


def evaluate(scorers: list[Scorer], eval_set: EvalSet) -> Evaluation:
    runs = {eval_set.first_stage: eval_set.candidates}
    for scorer in scorers:
        name, copy = scorer.name, 1
        while name in runs:  # e.g. two model dirs of one name: both rows stay
            copy += 1
            name = f"{scorer.name} #{copy}"
        runs[name] = rerank(scorer, eval_set)
    qrels = eval_set.qrels
    rows: list[dict[str, float | str]] = [
        {"name": name, **measure(qrels, run)} for name, run in runs.items()
    ]
    per_query = {name: per_query_ndcg(qrels, run) for name, run in runs.items()}
    comparisons = [
        compare(system, per_query[system], baseline, per_query[baseline], qrels)
        for baseline, system in combinations(runs, 2)
    ]
    return Evaluation(rows, comparisons)


def format_report(evaluation: Evaluation) -> str:
    rows = evaluation.rows
    width = max(len("system"), *(len(str(r["name"])) for r in rows))
    lines = [f"{'system':<{width}}  " + "  ".join(f"{m:>8}" for m in MEASURE_NAMES)]
    for row in rows:
        figures = "  ".join(f"{row[m]:>8.4f}" for m in MEASURE_NAMES)
        lines.append(f"{row['name']!s:<{width}}  {figures}")
    if evaluation.comparisons:
        lines.append("nDCG@10 differences, query by query (paired t-test):")
    for c in evaluation.comparisons:
        lines.append(
            f"  {c.system} vs {c.baseline}: {c.delta:+.4f}, p = {format_p(c.p_value)}, "
            f"better on {c.wins} queries, worse on {c.losses}"
        )
    return "\n".join(lines)
