from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from crossrank_train.readers import (
    parse_grade_map,
    read_beir,
    read_corpus,
    read_pairs,
    read_qrels,
    read_queries,
    read_run,
    read_wikiqa,
)


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_beir_corpus_queries_and_qrels(tmp_path: Path) -> None:
    corpus = _write(
        tmp_path / "corpus.jsonl.gz",
        _jsonl(
            [
                {"_id": "d1", "title": "Cats", "text": "Cats purr."},
                {"_id": "d2", "title": "", "text": "Dogs bark."},
            ]
        ),
    )
    queries = _write(tmp_path / "queries.jsonl", _jsonl([{"_id": "7", "text": "do cats purr"}]))
    qrels = _write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\n7\td1\t1\n7\td2\t0\n\n")

    collection = read_beir(corpus, queries, qrels)

    assert collection.corpus == {"d1": "Cats Cats purr.", "d2": "Dogs bark."}
    assert collection.queries == {"7": "do cats purr"}
    assert collection.qrels == {"7": {"d1": 1, "d2": 0}}


def test_trec_dl_queries_passages_qrels_and_run(tmp_path: Path) -> None:
    queries = _write(tmp_path / "queries.tsv", "2082\tage of bone loss?\n30611\tmen's age\n")
    passages = _write(
        tmp_path / "passages.jsonl.gz",
        _jsonl([{"_id": "msmarco_passage_01_5", "text": 'Bone "mass" peaks at 30.'}]),
    )
    qrels = _write(tmp_path / "qrels.txt", "2082 0 msmarco_passage_01_5 3\n2082 0 p9 0\n")
    run = _write(
        tmp_path / "BM25.top100.run",
        "2082 Q0 msmarco_passage_01_5 1 13.5 BM25\n2082 Q0 p9 2 11.25 BM25\n",
    )

    assert read_queries(queries) == {"2082": "age of bone loss?", "30611": "men's age"}
    assert read_corpus(passages) == {"msmarco_passage_01_5": 'Bone "mass" peaks at 30.'}
    assert read_qrels(qrels) == {"2082": {"msmarco_passage_01_5": 3, "p9": 0}}
    assert read_run(run) == {"2082": {"msmarco_passage_01_5": 13.5, "p9": 11.25}}


def test_wikiqa_candidates_become_judged_passages(tmp_path: Path) -> None:
    tsv = _write(
        tmp_path / "train.tsv",
        "qid\tquestion\tsentence\tlabel\n"
        "1\thow are glacier caves formed ?\ta cave in a glacier .\t0\n"
        '1\thow are glacier caves formed ?\tmelt water forms "caves" .\t1\n'
        "2\twho wrote it ?\tnobody knows .\t0\n",
    )

    collection = read_wikiqa(tsv)

    assert collection.queries == {"1": "how are glacier caves formed ?", "2": "who wrote it ?"}
    assert collection.qrels == {"1": {"1-0": 0, "1-1": 1}, "2": {"2-0": 0}}
    assert collection.corpus["1-1"] == 'melt water forms "caves" .'


def test_pairs_with_pids_resolve_negatives_through_the_corpus(tmp_path: Path) -> None:
    corpus = _write(
        tmp_path / "corpus.jsonl.gz",
        _jsonl(
            [
                {"pid": "p1", "title": "Gold", "text": "gold paragraph"},
                {"pid": "p2", "title": "", "text": "other paragraph"},
                {"pid": "p3", "title": "", "text": "third paragraph"},
            ]
        ),
    )
    pairs = _write(
        tmp_path / "dev.jsonl.gz",
        _jsonl(
            [
                {
                    "id": "q1",
                    "query": "where is gold",
                    "positives": ["gold paragraph"],
                    "positive_pids": ["p1"],
                    "negatives": ["other paragraph"],
                    "negative_pids": ["p2", "p3"],
                }
            ]
        ),
    )

    collection = read_pairs(pairs, corpus)

    assert collection.queries == {"q1": "where is gold"}
    assert collection.qrels == {"q1": {"p1": 1, "p2": 0, "p3": 0}}
    assert collection.corpus["p3"] == "third paragraph"
    # The corpus's text (with its title) wins over the record's copy, so every record that
    # names p1 reads the same passage.
    assert collection.corpus["p1"] == "Gold gold paragraph"


def test_pairs_without_pids_name_passages_by_their_text(tmp_path: Path) -> None:
    pairs = _write(
        tmp_path / "medquad.jsonl.gz",
        _jsonl(
            [
                {"id": "a", "query": "what is x", "positives": ["x is a"], "negatives": ["y is b"]},
                {"id": "b", "query": "what is y", "positives": ["y is b"], "negatives": []},
            ]
        ),
    )

    collection = read_pairs(pairs)

    assert len(collection.corpus) == 2
    (y_id,) = collection.qrels["b"]
    # One passage: a negative of "a" and the positive of "b".
    assert collection.qrels["a"][y_id] == 0
    assert collection.qrels["b"][y_id] == 1
    assert collection.corpus[y_id] == "y is b"


def test_trec_sgml_documents_and_topics(tmp_path: Path) -> None:
    docs = _write(
        tmp_path / "doc-text.trec.gz",
        "<DOC>\n<DOCNO>1</DOCNO>\ncompact memories  have\nflexible capacities\n</DOC>\n"
        "<DOC>\n<DOCNO> FT-2 </DOCNO>\n<TEXT>an analogue\ncomputer</TEXT>\n</DOC>\n",
    )
    # Vaswani's closed tags, and the classic TREC layout with open <num>/<title> and prefixes.
    topics = _write(
        tmp_path / "query-text.trec",
        "<top>\n<num>1</num><title>\nMEASUREMENT OF DIELECTRIC CONSTANT\n</title>\n</top>\n"
        "<top>\n<num> Number: 301\n<title> Topic: International Organized Crime\n"
        "<desc> Description:\nIdentify organizations.\n</top>\n",
    )

    assert read_corpus(docs) == {
        "1": "compact memories have flexible capacities",
        "FT-2": "an analogue computer",
    }
    assert read_queries(topics) == {
        "1": "MEASUREMENT OF DIELECTRIC CONSTANT",
        "301": "International Organized Crime",
    }


def test_smart_documents_queries_and_graded_qrels(tmp_path: Path) -> None:
    docs = _write(
        tmp_path / "cran.all.1400.gz",
        ".I 1\n.T\nwing in a\nslipstream .\n.A\nbrenckman,m.\n.B\nj. ae. scs. 25.\n"
        ".W\nan experimental study\nof a wing .\n.I 2\n.T\nsimple shear flow .\n.W\n"
        "the flow past\n.5 inch plates .\n",
    )
    # Cranfield numbers its requests 001, 002, 004, ...; its relevance file counts them 1, 2, 3.
    queries = _write(
        tmp_path / "cran.qry",
        ".I 001\n.W\nwhat similarity laws\nmust be obeyed .\n.I 002\n.W\nwhat are the\n"
        "structural problems .\n.I 004\n.W\nheat conduction .\n",
    )
    qrels = _write(tmp_path / "cranqrel", "1 184 2\n1 29 2 \n3 2 -1\n3 1 1\n")

    assert read_corpus(docs) == {
        "1": "wing in a slipstream . an experimental study of a wing .",
        "2": "simple shear flow . the flow past .5 inch plates .",
    }
    assert read_queries(queries) == {
        "1": "what similarity laws must be obeyed .",
        "2": "what are the structural problems .",
        "3": "heat conduction .",
    }
    assert read_qrels(qrels) == {"1": {"184": 2, "29": 2}, "3": {"2": -1, "1": 1}}
    # Cleverdon's scale (1 = complete answer ... 4 = minimum interest) turned into gains.
    gains = read_qrels(qrels, parse_grade_map("1=4,2=3,3=2,4=1,-1=0"))
    assert gains == {"1": {"184": 3, "29": 3}, "3": {"2": 0, "1": 4}}


def test_smart_relevance_file_without_grades_marks_every_pair_relevant(tmp_path: Path) -> None:
    # CISI.REL: "qid docid 0 0.000000"; the last two columns carry nothing.
    cisi = _write(tmp_path / "CISI.REL", "     1     28\t0\t0.000000\n     1     35\t0\t0.000000\n")
    pairs = _write(tmp_path / "pairs.rel", "4 9\n")

    assert read_qrels(cisi) == {"1": {"28": 1, "35": 1}}
    assert read_qrels(pairs) == {"4": {"9": 1}}


def test_qrels_of_no_known_layout_are_refused_not_guessed(tmp_path: Path) -> None:
    fractional = _write(tmp_path / "trec.qrels", "301 0 FT1 1.0\n")
    odd_row = _write(tmp_path / "CISI.REL", "1 28 0 0.000000\n1 35 2 0.500000\n")

    with pytest.raises(ValueError, match="not BEIR, TREC or SMART qrels"):
        read_qrels(fractional)
    with pytest.raises(ValueError, match="not a CISI-style relevance line"):
        read_qrels(odd_row)


def test_grade_map_rejects_what_is_not_integer_pairs() -> None:
    assert parse_grade_map(None) is None
    assert parse_grade_map("-1=0, 3=1") == {-1: 0, 3: 1}
    for bad in ("1", "1=a", "x=2", "1=2,"):
        with pytest.raises(ValueError, match="OLD=NEW"):
            parse_grade_map(bad)
