"""Readers for the relevance data formats crossrank trains and evaluates on. All take paths.

Every reader returns plain dicts: queries ``{qid: text}``, a corpus ``{pid: text}``, qrels
``{qid: {pid: grade}}`` and runs ``{qid: {pid: score}}`` (the shapes ir-measures takes).
Besides BEIR, TREC DL and the JSONL/TSV sources, the classic test collections are read in
their own formats: TREC SGML documents and topics (Vaswani) and SMART files (Cranfield, CISI),
each told apart by its first line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
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


def _first_line(path: str | Path) -> str:
    with open_text(path) as f:
        return next((line.strip() for line in f if line.strip()), "")


_SMART_FIELD = re.compile(r"^\.([A-Z])(?:\s+(.*))?$")


def _joined(fields: dict[str, list[str]]) -> dict[str, str]:
    return {name: " ".join(" ".join(lines).split()) for name, lines in fields.items()}


def _smart_records(path: str | Path) -> Iterator[tuple[str, dict[str, str]]]:
    """SMART records: ``.I id`` opens one, ``.T``/``.W``/... lines open its fields, the lines
    below a field marker are its text (a field given twice is joined)."""
    record_id: str | None = None
    fields: dict[str, list[str]] = {}
    current: list[str] = []
    with open_text(path) as f:
        for line in f:
            marker = _SMART_FIELD.match(line.rstrip())
            if marker and marker.group(1) == "I":
                if record_id is not None:
                    yield record_id, _joined(fields)
                record_id, fields = (marker.group(2) or "").strip(), {}
                current = []
            elif marker:
                current = fields.setdefault(marker.group(1), [])
                current.append(marker.group(2) or "")
            else:
                current.append(line)
    if record_id is not None:
        yield record_id, _joined(fields)


def _smart_corpus(path: str | Path) -> dict[str, str]:
    # Title, then abstract: the same "title text" as BEIR passages get (Cranfield's abstracts
    # often repeat the title; left as published).
    return {
        pid: " ".join(part for part in (f.get("T", ""), f.get("W", "")) if part)
        for pid, f in _smart_records(path)
    }


def _smart_queries(path: str | Path) -> dict[str, str]:
    # Numbered by position, 1..n: Cranfield's ".I" numbers skip (001, 002, 004, ...) while its
    # relevance file, like every published Cranfield figure, counts queries by position; in
    # CISI the two agree. The text is the request (.W), not the bibliographic fields.
    return {
        str(n): f.get("W") or f.get("T", "")
        for n, (_, f) in enumerate(_smart_records(path), start=1)
    }


_TAG = re.compile(r"<[^>]+>")


def _trec_documents(path: str | Path) -> dict[str, str]:
    """TREC SGML: ``<DOC><DOCNO>id</DOCNO> text </DOC>``; any other tags inside are dropped."""
    with open_text(path) as f:
        content = f.read()
    corpus: dict[str, str] = {}
    for block in re.findall(r"<DOC>(.*?)</DOC>", content, flags=re.S | re.I):
        docno = re.search(r"<DOCNO>\s*(.*?)\s*</DOCNO>", block, flags=re.S | re.I)
        if docno is None:
            raise ValueError(f"{path}: a <DOC> without <DOCNO>")
        text = block[: docno.start()] + block[docno.end() :]
        corpus[docno.group(1)] = " ".join(_TAG.sub(" ", text).split())
    return corpus


def _trec_topics(path: str | Path) -> dict[str, str]:
    """TREC topics: ``<top>`` blocks with ``<num>`` and ``<title>`` (closed or not, with or
    without "Number:"/"Topic:"); the title is the query, as in TREC's title runs."""
    with open_text(path) as f:
        content = f.read()
    queries: dict[str, str] = {}
    for block in re.findall(r"<top>(.*?)</top>", content, flags=re.S | re.I):
        num = re.search(r"<num>\s*(?:Number:)?\s*([^<\s]+)", block, flags=re.I)
        title = re.search(
            r"<title>\s*(?:Topic:)?(.*?)(?=</title>|<desc>|<narr>|$)", block, flags=re.S | re.I
        )
        if num is None or title is None:
            raise ValueError(f"{path}: a <top> without <num> or <title>")
        queries[num.group(1)] = " ".join(title.group(1).split())
    return queries


def read_corpus(path: str | Path) -> dict[str, str]:
    """A BEIR-style corpus, JSONL(.gz): ``_id`` (or ``pid``), optional ``title``, ``text``;
    or TREC SGML documents, or a SMART document file.

    The title is prepended to the text, as BEIR's own cross-encoder evaluation does.
    """
    first = _first_line(path)
    if first.upper().startswith("<DOC"):
        return _trec_documents(path)
    if first.startswith(".I"):
        return _smart_corpus(path)
    corpus: dict[str, str] = {}
    for record in _jsonl(path):
        pid = str(record.get("_id", record.get("pid")))
        title = (record.get("title") or "").strip()
        text = record.get("text") or ""
        corpus[pid] = f"{title} {text}" if title else text
    return corpus


def read_queries(path: str | Path) -> dict[str, str]:
    """BEIR ``queries.jsonl`` (``_id``, ``text``), a TSV of ``id<TAB>text`` (TREC DL), TREC
    topics (``<top>``) or a SMART query file (``.I``)."""
    if _is_jsonl(path):
        return {str(r["_id"]): r["text"] for r in _jsonl(path)}
    first = _first_line(path)
    if first.lower().startswith("<top>"):
        return _trec_topics(path)
    if first.startswith(".I"):
        return _smart_queries(path)
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


# CISI.REL's third and fourth columns, the same on every line: they carry no grade.
_CISI_EMPTY_COLUMNS = ["0", "0.000000"]


def read_smart_qrels(path: str | Path) -> Qrels:
    """Headerless ``qid docid [grade]`` lines (Cranfield's ``cranqrel``); without a grade column,
    or with CISI's two empty columns (``CISI.REL``: ``qid docid 0 0.000000``), every listed pair
    is relevant (grade 1)."""
    qrels: Qrels = {}
    with open_text(path) as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if len(fields) == 4 and fields[2:] != _CISI_EMPTY_COLUMNS:
                raise ValueError(f"{path}: {line.strip()!r} is not a CISI-style relevance line")
            graded = len(fields) == 3
            qrels.setdefault(fields[0], {})[fields[1]] = int(fields[2]) if graded else 1
    return qrels


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def read_qrels(path: str | Path, grade_map: dict[int, int] | None = None) -> Qrels:
    """BEIR TSV (a header line), TREC qrels (four fields, an integer grade last) or SMART
    relevance files (``read_smart_qrels``), told apart by the first line.

    ``grade_map`` renames grades (those it does not name are kept): scales that are not
    "higher is better", such as Cranfield's (1 = a complete answer ... 4 = of minimum
    interest, -1 = none), must be turned into gains before nDCG means anything.
    """
    first = _first_line(path).split()
    if len(first) == 4 and _is_int(first[3]):
        qrels = read_trec_qrels(path)
    elif len(first) == 3 and not _is_int(first[2]):
        qrels = read_beir_qrels(path)
    elif len(first) in (2, 3) or (len(first) == 4 and first[2:] == _CISI_EMPTY_COLUMNS):
        qrels = read_smart_qrels(path)
    else:
        # e.g. TREC qrels with fractional grades: guessing would misread a column silently.
        raise ValueError(f"{path}: not BEIR, TREC or SMART qrels (first line: {' '.join(first)})")
    if grade_map:
        qrels = {
            qid: {pid: grade_map.get(grade, grade) for pid, grade in judged.items()}
            for qid, judged in qrels.items()
        }
    return qrels


def parse_grade_map(text: str | None) -> dict[int, int] | None:
    """``"1=4,-1=0"`` (the CLI's ``--grade-map``) -> ``{1: 4, -1: 0}``."""
    if not text:
        return None
    grade_map: dict[int, int] = {}
    for item in text.split(","):
        old, sep, new = item.partition("=")
        if not sep or not _is_int(old.strip()) or not _is_int(new.strip()):
            raise ValueError(f"--grade-map takes OLD=NEW integer pairs, got {item!r}")
        grade_map[int(old)] = int(new)
    return grade_map


def read_run(path: str | Path) -> Run:
    """A TREC run: ``qid Q0 docid rank score tag``."""
    run: Run = {}
    for doc in ir_measures.read_trec_run(str(path)):
        run.setdefault(doc.query_id, {})[doc.doc_id] = doc.score
    return run


def read_beir(
    corpus: str | Path,
    queries: str | Path,
    qrels: str | Path,
    grade_map: dict[int, int] | None = None,
) -> Collection:
    """Queries, corpus and qrels files (``grade_map``: see ``read_qrels``)."""
    return Collection(read_queries(queries), read_corpus(corpus), read_qrels(qrels, grade_map))


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
    grade_map: dict[int, int] | None = None,
) -> Collection:
    """Whichever source the paths name: a pairs JSONL (with an optional corpus), a WikiQA TSV,
    or BEIR/TREC queries, qrels and corpus together (``grade_map`` renames their qrels' grades;
    pairs and WikiQA are judged 0/1)."""
    if pairs:
        return read_pairs(pairs, corpus)
    if wikiqa:
        return read_wikiqa(wikiqa)
    if queries and qrels and corpus:
        return read_beir(corpus, queries, qrels, grade_map)
    raise ValueError("give --queries, --qrels and --corpus, or --pairs, or --wikiqa")
