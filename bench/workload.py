"""Realistic re-ranking workloads: one real query and N real passages of varied lengths, seeded.

Text comes from files (nothing is built in): passages from a JSONL(.gz) with a ``text`` field
(e.g. ``../shared/data/trec-dl-2021/passages.jsonl.gz``) or a plain file with one passage a line;
queries from a TSV ``id<TAB>text`` (e.g. ``trec-dl-2021/queries.tsv``) or one query a line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def read_passages(path: Path) -> list[str]:
    lines = _lines(path)
    if ".jsonl" in path.name:
        return [json.loads(line)["text"] for line in lines]
    return lines


def read_queries(path: Path) -> list[str]:
    return [line.split("\t", 1)[-1] for line in _lines(path)]


@dataclass(frozen=True)
class Request:
    query: str
    passages: list[str]


class Workload:
    def __init__(self, passages: Path, queries: Path, seed: int = 0) -> None:
        self.passages = read_passages(passages)
        self.queries = read_queries(queries)
        self.rng = random.Random(seed)

    def request(self, n: int) -> Request:
        return Request(self.rng.choice(self.queries), self.rng.sample(self.passages, n))

    def requests(self, count: int, n: int, seed: int) -> list[Request]:
        """``count`` requests of ``n`` passages, the same for the same seed (whatever was drawn
        before): every system in a comparison gets exactly the same load."""
        rng = random.Random(seed)
        return [
            Request(rng.choice(self.queries), rng.sample(self.passages, n)) for _ in range(count)
        ]


def served_workload_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench script's parser with what every served-model bench takes: the model directory
    served and the passages and queries its requests are drawn from."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the model directory served")
    parser.add_argument("--passages", type=Path, required=True, help="passages.jsonl.gz")
    parser.add_argument("--queries", type=Path, required=True, help="queries.tsv")
    return parser
