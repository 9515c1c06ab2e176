"""Training groups: one query, one positive passage, k negatives (and optional teacher scores).

On disk a JSONL file, one group a line: ``{"query", "positive", "negatives": [...]}``, plus
``"teacher_scores": [positive, *negatives]`` when a teacher scored the group (MarginMSE).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from crossrank_train.readers import open_text


@dataclass(frozen=True)
class Group:
    query: str
    positive: str
    negatives: list[str]
    teacher_scores: list[float] | None = None

    @property
    def passages(self) -> list[str]:
        """The positive first, then the negatives: the order every loss expects."""
        return [self.positive, *self.negatives]

    def head(self, negatives: int) -> Group:
        """This group cut to its first ``negatives`` negatives."""
        scores = self.teacher_scores[: negatives + 1] if self.teacher_scores else None
        return Group(self.query, self.positive, self.negatives[:negatives], scores)


def write_groups(path: str | Path, groups: Iterable[Group]) -> int:
    count = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for group in groups:
            record = {k: v for k, v in asdict(group).items() if v is not None}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_groups(path: str | Path, negatives: int | None = None) -> list[Group]:
    """Read groups; with ``negatives``, cut each to that many and refuse groups with fewer."""
    groups: list[Group] = []
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            group = Group(**json.loads(line))
            if negatives is not None:
                if len(group.negatives) < negatives:
                    raise ValueError(
                        f"{path}:{line_no}: the group has {len(group.negatives)} negatives, "
                        f"fewer than the {negatives} asked for (mine with --negatives {negatives})"
                    )
                group = group.head(negatives)
            groups.append(group)
    return groups
