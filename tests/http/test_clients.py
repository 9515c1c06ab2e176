"""Real rerank clients against a real server, by base URL alone: the Cohere SDK, litellm's
cohere and hosted_vllm providers, and langchain's JinaRerank (a Jina-style client), each reading
an answer and an error's message."""

from __future__ import annotations

import cohere
import httpx
import pytest
from support import RunningServer

QUERY = "the capital of france"
DOCUMENTS = ["a cat on a mat", "paris is the capital of france", "blue sky over the sea"]


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """The same order and, to float tolerance, the same scores."""
    return [i for i, _ in got] == [i for i, _ in want] and [s for _, s in got] == pytest.approx(
        [s for _, s in want]
    )


def expected(server: RunningServer) -> list[tuple[int, float]]:
    """The server's own ranking of DOCUMENTS, by its Cohere route."""
    with server.client() as c:
        body = c.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}).json()
    return [(r["index"], r["relevance_score"]) for r in body["results"]]


def test_the_cohere_sdk_reranks_and_reads_an_error(server: RunningServer) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    answer = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS, top_n=2)
    assert same([(r.index, r.relevance_score) for r in answer.results], expected(server)[:2])
    with pytest.raises(cohere.errors.UnprocessableEntityError) as refused:
        client.rerank(model="rerank-v3.5", query=" ", documents=DOCUMENTS)
    assert "query" in refused.value.body["message"]


@pytest.fixture
def litellm(monkeypatch: pytest.MonkeyPatch):
    # litellm fetches its model price map from the internet at import unless told otherwise.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


@pytest.mark.parametrize("model", ["cohere/rerank-v3.5", "hosted_vllm/any-name"])
def test_litellm_reranks_by_base_url(server: RunningServer, litellm, model: str) -> None:
    # hosted_vllm appends /rerank to a base URL without /v1 and sends Cohere's body there.
    answer = litellm.rerank(
        model=model, query=QUERY, documents=DOCUMENTS, api_base=server.url, api_key="unused"
    )
    got = [(r["index"], r["relevance_score"]) for r in answer.results]
    assert same(got, expected(server))


def test_a_jina_style_client_reads_the_error_message(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import langchain_community.document_compressors.jina_rerank as jina

    monkeypatch.setattr(jina, "JINA_API_URL", server.url + "/v1/rerank")
    reranker = jina.JinaRerank(jina_api_key="unused")
    ranked = reranker.rerank(DOCUMENTS, QUERY)
    assert same([(r["index"], r["relevance_score"]) for r in ranked], expected(server))
    # It reads a failure's message from `detail` (a KeyError before the body had one).
    with pytest.raises(RuntimeError, match="query"):
        reranker.rerank(DOCUMENTS, " ")


def test_every_error_body_carries_its_message_where_clients_look(server: RunningServer) -> None:
    with server.client() as c:
        for path, body in (
            ("/rerank", {"query": "q"}),
            ("/v1/rerank", {"query": "q", "documents": []}),
            ("/nowhere", {}),
        ):
            error = c.post(path, json=body).json()
            assert error["message"] == error["detail"] == error["error"]["message"]


def test_a_cohere_shaped_body_at_rerank_is_answered_in_cohere_shape(
    server: RunningServer,
) -> None:
    with server.client() as c:
        cohere_shaped = c.post(
            "/rerank", json={"query": QUERY, "documents": DOCUMENTS, "return_documents": True}
        )
        both = c.post(
            "/rerank", json={"query": QUERY, "documents": DOCUMENTS, "passages": DOCUMENTS}
        )
        blank = c.post("/rerank", json={"query": QUERY, "documents": ["a", " "]})
    assert cohere_shaped.status_code == 200
    answer = cohere_shaped.json()
    assert same([(r["index"], r["relevance_score"]) for r in answer["results"]], expected(server))
    assert answer["results"][0]["document"] == {"text": DOCUMENTS[answer["results"][0]["index"]]}
    assert both.status_code == 422
    assert "not both" in both.json()["error"]["message"]
    assert blank.status_code == 422 and blank.json()["error"]["field"] == "documents[1]"


def test_an_over_long_document_is_named_as_the_cohere_body_names_it(
    server: RunningServer,
) -> None:
    long = " ".join(["paris"] * 400)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/rerank", json={"query": QUERY, "passages": ["a", long], "truncate": False})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "passages[1]"
