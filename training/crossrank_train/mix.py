"""Mixing training groups from several sources into one shuffled, de-duplicated file.

``python -m crossrank_train.mix --out MIX.jsonl SOURCE.jsonl:CAP ...``: each source contributes
at most CAP groups (sampled, seeded), at most ``--max-per-query`` per query (NFCorpus judges dozens
of passages per query; without a cap a few queries would dominate), and a (query, positive) pair
seen in an earlier source is dropped.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from crossrank_train.groups import Group, read_groups, write_groups


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def mix_groups(
    sources: Sequence[tuple[list[Group], int]], max_per_query: int, seed: int
) -> list[Group]:
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    mixed: list[Group] = []
    for groups, cap in sources:
        order = list(groups)
        rng.shuffle(order)
        per_query: dict[str, int] = defaultdict(int)
        taken = 0
        for group in order:
            key = (_key(group.query), _key(group.positive))
            if taken >= cap or key in seen or per_query[key[0]] >= max_per_query:
                continue
            seen.add(key)
            per_query[key[0]] += 1
            mixed.append(group)
            taken += 1
    rng.shuffle(mixed)
    return mixed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossrank_train.mix", description=__doc__)
    parser.add_argument("sources", nargs="+", help="GROUPS.jsonl:CAP")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-per-query", type=int, default=2)
    parser.add_argument("--negatives", type=int, default=7, help="groups with fewer are refused")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sources = []
    for spec in args.sources:
        path, _, cap = spec.rpartition(":")
        groups = read_groups(path, args.negatives)
        sources.append((groups, int(cap)))
        print(f"{path}: {len(groups)} groups, cap {cap}")
    mixed = mix_groups(sources, args.max_per_query, args.seed)
    write_groups(args.out, mixed)
    print(f"wrote {len(mixed)} groups to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
