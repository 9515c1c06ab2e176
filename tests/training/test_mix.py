"""Mixing sources: caps, per-query caps, de-duplication across sources, determinism."""

from __future__ import annotations

from pathlib import Path

from crossrank_train.groups import Group, read_groups, write_groups
from crossrank_train.mix import main, mix_groups


def groups(prefix: str, queries: int, per_query: int) -> list[Group]:
    return [
        Group(f"{prefix} query {q}", f"{prefix} positive {q}.{p}", ["n1", "n2", "n3"])
        for q in range(queries)
        for p in range(per_query)
    ]


def test_caps_and_per_query_limit() -> None:
    mixed = mix_groups([(groups("a", 10, 5), 100), (groups("b", 50, 1), 20)], 2, seed=0)
    from_a = [g for g in mixed if g.query.startswith("a ")]
    assert len(from_a) == 20  # 10 queries x at most 2 groups each
    assert len(mixed) - len(from_a) == 20  # source b capped at 20


def test_duplicates_across_sources_are_dropped() -> None:
    a = [Group("What is X?", "X is a thing.", ["n"])]
    b = [Group("what  is x?", "x is a THING.", ["m"]), Group("other", "p", ["m"])]
    mixed = mix_groups([(a, 10), (b, 10)], 2, seed=0)
    assert sorted(g.query for g in mixed) == ["What is X?", "other"]


def test_seeded_and_shuffled(tmp_path: Path) -> None:
    source = tmp_path / "s.jsonl"
    write_groups(source, groups("s", 40, 1))
    out1, out2 = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    assert main([f"{source}:30", "--out", str(out1), "--negatives", "3"]) == 0
    assert main([f"{source}:30", "--out", str(out2), "--negatives", "3"]) == 0
    first = read_groups(out1)
    assert first == read_groups(out2)
    assert len(first) == 30
    assert [g.query for g in first] != sorted(g.query for g in first)
