"""Readers for the relevance data formats crossrank trains and evaluates on. All take paths.

Every reader returns plain dicts: queries ``{qid: text}``, a corpus ``{pid: text}``, qrels
``{qid: {pid: grade}}`` and runs ``{qid: {pid: score}}`` (the shapes ir-measures takes).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ir_measures

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


@dataclass
class Collection:
    """Queries, passages and judgements, whatever file format they came from."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: Qrels = field(default_factory=dict)


def open_text(path: str | Path) -> TextIO:
    """Open a text file, gunzipping it when its name ends in .gz."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _is_jsonl(path: str | Path) -> bool:
    return ".jsonl" in Path(path).suffixes


def read_corpus(path: str | Path) -> dict[str, str]:
    """A BEIR-style corpus, JSONL(.gz): ``_id`` (or ``pid``), optional ``title``, ``text``.

    The title is prepended to the text, as BEIR's own cross-encoder evaluation does.
    """
    corpus: dict[str, str] = {}
    for record in _jsonl(path):
        pid = str(record.get("_id", record.get("pid")))
        title = (record.get("title") or "").strip()
        text = record.get("text") or ""
        corpus[pid] = f"{title} {text}" if title else text
    return corpus


def read_queries(path: str | Path) -> dict[str, str]:
    """BEIR ``queries.jsonl`` (``_id``, ``text``), or a TSV of ``id<TAB>text`` (TREC DL)."""
    if _is_jsonl(path):
        return {str(r["_id"]): r["text"] for r in _jsonl(path)}
    with open_text(path) as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {row[0]: row[1] for row in rows if len(row) >= 2}


def read_beir_qrels(path: str | Path) -> Qrels:
    """BEIR qrels TSV: a ``query-id corpus-id score`` header, then one judgement a line."""
    qrels: Qrels = {}
    with open_text(path) as f:
        rows = csv.reader(f, delimiter="\t")
        next(rows, None)
        for row in rows:
            if row:
                qid, pid, grade = row
                qrels.setdefault(qid, {})[pid] = int(grade)
    return qrels


def read_trec_qrels(path: str | Path) -> Qrels:
    """TREC qrels: ``qid iteration docid grade``."""
    qrels: Qrels = {}
    for qrel in ir_measures.read_trec_qrels(str(path)):
        qrels.setdefault(qrel.query_id, {})[qrel.doc_id] = qrel.relevance
    return qrels


def read_qrels(path: str | Path) -> Qrels:
    """BEIR TSV or TREC qrels, told apart by the first line (TREC lines have four fields)."""
    with open_text(path) as f:
        first = f.readline().split()
    return read_trec_qrels(path) if len(first) == 4 else read_beir_qrels(path)


def read_run(path: str | Path) -> Run:
    """A TREC run: ``qid Q0 docid rank score tag``."""
    run: Run = {}
    for doc in ir_measures.read_trec_run(str(path)):
        run.setdefault(doc.query_id, {})[doc.doc_id] = doc.score
    return run


def read_beir(corpus: str | Path, queries: str | Path, qrels: str | Path) -> Collection:
    return Collection(read_queries(queries), read_corpus(corpus), read_qrels(qrels))


def read_wikiqa(path: str | Path) -> Collection:
    """WikiQA TSV (``qid question sentence label`` with a header); each candidate sentence gets
    the id ``<qid>-<n>``, judged by its label."""
    collection = Collection({}, {})
    with open_text(path) as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            qid = row["qid"]
            collection.queries[qid] = row["question"]
            judged = collection.qrels.setdefault(qid, {})
            pid = f"{qid}-{len(judged)}"
            collection.corpus[pid] = row["sentence"]
            judged[pid] = int(row["label"])
    return collection


def _text_id(text: str) -> str:
    # Records without pids (NQ-QED, MedQuAD) name passages by content, so a passage that is one
    # query's positive and another's negative is one corpus entry.
    return "t:" + hashlib.sha1(text.encode()).hexdigest()[:16]


def read_pairs(path: str | Path, corpus: str | Path | None = None) -> Collection:
    """JSONL(.gz) records ``{"id","query","positives":[text],"positive_pids","negatives":[text],
    "negative_pids"}`` (the pid lists optional). Positives are judged 1 and negatives 0.

    With ``corpus`` (a corpus file the pids refer to), a pid's text is the corpus's (so a
    passage reads the same in every record), negatives listed only by pid are resolved there,
    and the corpus's other passages join the collection unjudged.
    """
    passages = read_corpus(corpus) if corpus is not None else {}
    collection = Collection({}, dict(passages))
    for record in _jsonl(path):
        qid = str(record["id"])
        collection.queries[qid] = record["query"]
        judged = collection.qrels.setdefault(qid, {})
        for kind, grade in (("positive", 1), ("negative", 0)):
            texts = record.get(f"{kind}s") or []
            pids = record.get(f"{kind}_pids") or [_text_id(t) for t in texts]
            for index, pid in enumerate(pids):
                text = passages.get(pid) or (texts[index] if index < len(texts) else None)
                if text is None:
                    continue
                collection.corpus[pid] = text
                judged[pid] = grade
    return collection


def read_collection(
    *,
    queries: str | Path | None = None,
    qrels: str | Path | None = None,
    corpus: str | Path | None = None,
    pairs: str | Path | None = None,
    wikiqa: str | Path | None = None,
) -> Collection:
    """Whichever source the paths name: a pairs JSONL (with an optional corpus), a WikiQA TSV,
    or BEIR/TREC queries, qrels and corpus together."""
    if pairs:
        return read_pairs(pairs, corpus)
    if wikiqa:
        return read_wikiqa(wikiqa)
    if queries and qrels and corpus:
        return read_beir(corpus, queries, qrels)
    raise ValueError("give --queries, --qrels and --corpus, or --pairs, or --wikiqa")
