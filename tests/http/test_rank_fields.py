"""Structured documents: rank_fields on /rerank and the Cohere routes join the named fields, in
order, as 'field: value' lines; missing fields, non-strings and empty values are 422s naming the
document and field."""

from __future__ import annotations

import pytest
from support import RunningServer

QUERY = "capital of france"
DOCS = [
    {"title": "the cat", "body": "the cat sat on the mat", "year": 2001},
    {"title": "paris", "body": "paris is the capital of france", "year": 1999},
]


def test_rank_fields_score_the_joined_text(server: RunningServer) -> None:
    joined = [f"title: {d['title']}\nbody: {d['body']}" for d in DOCS]
    with server.client() as c:
        fields = c.post(
            "/rerank",
            json={"query": QUERY, "passages": DOCS, "rank_fields": ["title", "body"],
                  "raw_scores": True, "return_passages": True},
        ).json()  # fmt: skip
        plain = c.post(
            "/rerank", json={"query": QUERY, "passages": joined, "raw_scores": True}
        ).json()
        reordered = c.post(
            "/rerank",
            json={"query": QUERY, "passages": DOCS, "rank_fields": ["body", "title"],
                  "raw_scores": True, "return_passages": True},
        ).json()  # fmt: skip
        cohere = c.post(
            "/v1/rerank",
            json={"query": QUERY, "documents": DOCS, "rank_fields": ["title", "body"],
                  "return_documents": True},
        ).json()  # fmt: skip
        text_objects = c.post(
            "/v1/rerank", json={"query": QUERY, "documents": [{"text": d["body"]} for d in DOCS]}
        ).json()
    assert [r["index"] for r in fields["results"]] == [r["index"] for r in plain["results"]]
    assert [r["score"] for r in fields["results"]] == pytest.approx(
        [r["score"] for r in plain["results"]], abs=1e-5
    )
    assert {r["index"]: r["passage"] for r in fields["results"]} == dict(enumerate(joined))
    assert reordered["results"][0]["passage"].startswith("body: ")
    # Cohere echoes the document as sent.
    assert {r["index"]: r["document"] for r in cohere["results"]} == dict(enumerate(DOCS))
    assert len(text_objects["results"]) == 2


@pytest.mark.parametrize(
    ("documents", "rank_fields", "field"),
    [
        (DOCS, ["title", "abstract"], "documents[0].abstract"),
        (DOCS, ["title", "year"], "documents[0].year"),
        ([DOCS[0], DOCS[1] | {"body": "  "}], ["body"], "documents[1].body"),
        ([{"title": "no text"}], None, "documents[0].text"),
        (["a string", {"text": ""}], None, "documents[1].text"),
        (DOCS, [], "rank_fields"),
        (DOCS, [""], "rank_fields[0]"),
    ],
)
def test_rank_fields_errors_name_document_and_field(
    server: RunningServer, documents: list, rank_fields: list | None, field: str
) -> None:
    body = {"query": QUERY, "documents": documents, "rank_fields": rank_fields}
    passages = {"query": QUERY, "passages": documents, "rank_fields": rank_fields}
    with server.client() as c:
        cohere = c.post("/v1/rerank", json=body)
        native = c.post("/rerank", json=passages)
    assert cohere.status_code == 422, cohere.text
    assert cohere.json()["error"]["field"] == field
    assert native.status_code == 422
    assert native.json()["error"]["field"] == field.replace("documents", "passages")
