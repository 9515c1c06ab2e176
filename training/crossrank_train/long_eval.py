"""Long documents: nDCG@10 of a model directory re-ranking whole documents with truncate vs
chunk (max, mean and first window), as the service scores them.

``python -m crossrank_train.long_eval --model DIR --queries Q --qrels QRELS --corpus CORPUS
--window 128`` re-ranks BM25's candidates over the corpus's full texts (title + text) with the
model's pairs cut to ``--window`` tokens, so that documents longer than the window are common:
truncate scores each document's first window only; chunk scores every window (``--stride``
tokens of overlap, at most ``--max-chunks``) through the service's own tokenizer and aggregation.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crossrank.features.chunking import Aggregation, aggregate
from crossrank.model.collate import pad_pairs
from crossrank.model.engine import CPU, OnnxEngine, plan_session
from crossrank.model.model_dir import load_model_dir
from crossrank.model.tokenization import PairTokenizer, WindowTokenizer
from crossrank_train.evaluate import add_judged_set_flags, evaluate, format_report, judged_set
from crossrank_train.scoring import served_batches, served_limits


class WindowScorer:
    """A model directory's logits for (query, passage) pairs cut to ``window`` tokens, each
    passage truncated (``aggregation`` None) or chunked and aggregated."""

    def __init__(
        self,
        engine: OnnxEngine,
        tokenizer: PairTokenizer,
        name: str,
        chunking: tuple[WindowTokenizer, int] | None,  # the windows and how many a passage
        aggregation: Aggregation | None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.name = name
        self.chunking = chunking
        self.aggregation = aggregation
        self.limits = served_limits()
        # Window logits by request (evaluate runs one scorer over every query, then the next):
        # the aggregations of one chunking score the windows once.
        self.memo: dict[tuple[str, tuple[str, ...]], tuple[np.ndarray, list[int] | None]] = {}

    def windows(self, query: str, passages: Sequence[str]) -> tuple[np.ndarray, list[int] | None]:
        key = (query, tuple(passages))
        if key not in self.memo:
            if self.chunking is None:
                encoded = self.tokenizer.encode(query, list(passages))
            else:
                windows, max_chunks = self.chunking
                encoded = windows.encode(query, list(passages), max_chunks)
            pairs = encoded.pairs
            logits = np.empty(len(pairs), dtype=np.float32)
            for rows in served_batches([p.length for p in pairs], self.limits):
                logits[rows] = self.engine.run(pad_pairs([pairs[i] for i in rows]))
            self.memo[key] = (logits, encoded.owners)
        return self.memo[key]

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        logits, owners = self.windows(query, passages)
        if owners is None or self.aggregation is None:
            return logits
        return aggregate(logits, owners, len(passages), self.aggregation)[0]

    def aggregated(self, aggregation: Aggregation, name: str) -> WindowScorer:
        """The same windows (scored once, shared), another aggregation."""
        other = WindowScorer(self.engine, self.tokenizer, name, self.chunking, aggregation)
        other.memo = self.memo
        return other


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossrank_train.long_eval", description=__doc__
    )
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--variant", default="auto", help="auto: as on CPU")
    add_judged_set_flags(parser, depth=20)
    parser.add_argument("--window", type=int, default=128, help="pair tokens (max_length)")
    parser.add_argument("--stride", type=int, default=32, help="tokens shared by windows")
    parser.add_argument("--max-chunks", type=int, default=8, help="windows per document")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)

    model = load_model_dir(args.model)
    variant = model.choose_variant(args.variant, "cpu")
    engine = OnnxEngine(model.variant_path(variant), plan_session("cpu", [CPU]))
    meta = model.metadata
    window = min(args.window, meta.max_length)
    tokenizer = PairTokenizer(model.tokenizer_path, meta.max_query_tokens, window)
    chunking = (tokenizer.windows(args.stride), args.max_chunks)
    name = f"{meta.name} ({variant}, {window}-token window)"
    chunked = WindowScorer(engine, tokenizer, f"{name} chunk max", chunking, Aggregation.MAX)
    scorers = [
        WindowScorer(engine, tokenizer, f"{name} truncate", None, None),
        chunked,
        *(
            chunked.aggregated(how, f"{name} chunk {how.value}")
            for how in (Aggregation.MEAN, Aggregation.FIRST)
        ),
    ]
    eval_set = judged_set(args)
    candidates = sum(len(ranked) for ranked in eval_set.candidates.values())
    cut = sum(
        tokenizer.encode(query, [eval_set.corpus[p] for p in eval_set.candidates[qid]]).truncated
        for qid, query in eval_set.queries.items()
    )
    print(
        f"{len(eval_set.queries)} queries, {candidates} candidates; truncate cuts {cut} "
        f"({cut / candidates:.0%}) to the {window}-token window (chunk: stride {args.stride}, "
        f"at most {args.max_chunks} windows)"
    )
    print(format_report(evaluate(scorers, eval_set)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
