"""HTTP routes: parse, call the reranker, shape the answer. Nothing else lives here."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import PlainTextResponse, Response

from crossrank.errors import ErrorType
from crossrank.json_body import StrictJSONRoute
from crossrank.lifecycle import Service
from crossrank.responses import JSONResponse
from crossrank.schemas import (
    CohereRerankRequest,
    CohereResponse,
    HealthResponse,
    InfoResponse,
    ReadyResponse,
    RerankRequest,
    RerankResponse,
    document_texts,
    error_responses,
)

T = TypeVar("T")

# nginx's code for "client closed request": logged and counted, never seen by the client.
CLIENT_CLOSED = 499

router = APIRouter(route_class=StrictJSONRoute)

# What a rerank route can answer besides 200 (documented in the OpenAPI, checked by fuzzing).
RERANK_ERRORS = error_responses(
    ErrorType.UNAUTHORIZED,
    ErrorType.REQUEST_TIMEOUT,
    ErrorType.BODY_TOO_LARGE,
    ErrorType.INVALID_REQUEST,
    ErrorType.ENGINE_FAILURE,
    ErrorType.INTERNAL,
    ErrorType.QUEUE_FULL,
    ErrorType.NOT_READY,
    ErrorType.SHUTTING_DOWN,
    ErrorType.ENGINE_STALLED,
    ErrorType.DEADLINE_EXCEEDED,
)


def _service(request: Request) -> Service:
    return request.app.state.service


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; if the client goes away first, cancel it (its queued pairs are dropped)
    and return None. The body has been read, so the next ASGI message is the disconnect."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


@router.post(
    "/rerank",
    response_model=RerankResponse,
    responses=RERANK_ERRORS,
    summary="Score passages against a query and return them best first.",
)
async def rerank(body: RerankRequest, request: Request) -> Response:
    service = _service(request)
    reranker = service.require_ready()
    texts = document_texts(body.passages, body.rank_fields, "passages")
    ranked = await _until_disconnect(
        request,
        reranker.score(
            body.query,
            texts,
            raw_scores=body.raw_scores,
            truncate=body.truncate,
            timeout_ms=body.timeout_ms,
            passages_field="passages",
            instruction=body.instruction,
            long_passages=reranker.long_passages.override(
                body.long_passages, body.chunk_aggregation, body.max_chunks_per_doc
            ),
        ),
    )
    if ranked is None:
        return Response(status_code=CLIENT_CLOSED)
    results = []
    for i, score in ranked.best(body.top_k, body.min_score):
        result: dict[str, object] = {"index": i, "score": score}
        if body.return_passages:
            result["passage"] = texts[i]
        if ranked.spans is not None:
            result["span"] = ranked.span(i)
        results.append(result)
    return JSONResponse(
        {
            "results": results,
            "model": service.model_name,
            "usage": {
                "pairs": ranked.pairs,
                "chunks": ranked.chunks,
                "tokens": ranked.tokens,
                "truncated": ranked.truncated,
            },
        }
    )


@router.post(
    "/v1/rerank",
    response_model=CohereResponse,
    responses=RERANK_ERRORS,
    summary="Cohere/Jina-compatible rerank (also at /v2/rerank).",
)
@router.post(
    "/v2/rerank", response_model=CohereResponse, responses=RERANK_ERRORS, include_in_schema=False
)
async def cohere_rerank(body: CohereRerankRequest, request: Request) -> Response:
    service = _service(request)
    reranker = service.require_ready()
    texts = document_texts(body.documents, body.rank_fields, "documents")
    ranked = await _until_disconnect(
        request,
        reranker.score(
            body.query,
            texts,
            raw_scores=False,
            truncate=True,
            timeout_ms=None,
            passages_field="documents",
            instruction=body.instruction,
            long_passages=reranker.long_passages.override(
                body.long_passages, body.chunk_aggregation, body.max_chunks_per_doc
            ),
            max_passage_tokens=body.max_tokens_per_doc,
        ),
    )
    if ranked is None:
        return Response(status_code=CLIENT_CLOSED)
    results = []
    for i, score in ranked.best(body.top_n, body.min_score):
        result: dict[str, object] = {"index": i, "relevance_score": score}
        if body.return_documents:
            document = body.documents[i]
            result["document"] = {"text": document} if isinstance(document, str) else document
        if ranked.spans is not None:
            result["span"] = ranked.span(i)
        results.append(result)
    return JSONResponse(
        {
            "id": str(uuid.uuid4()),
            "results": results,
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": ranked.tokens, "output_tokens": 0},
            },
            "model": service.model_name,
            "usage": {"total_tokens": ranked.tokens},
        }
    )


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "the engine is stuck: restart"}}
    | error_responses(ErrorType.INTERNAL),
    summary="The process is alive (503 once the engine has been stuck past watchdog_liveness_s).",
)
async def health(request: Request) -> Response:
    reason = _service(request).liveness()
    if reason is None:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "stuck", "reason": reason}, status_code=503)


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready, and why"}}
    | error_responses(ErrorType.INTERNAL),
    summary="200 once the model is loaded, warm and working.",
)
async def ready(request: Request) -> Response:
    reason = _service(request).readiness()
    if reason is None:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


@router.get(
    "/info",
    response_model=InfoResponse,
    responses=error_responses(ErrorType.UNAUTHORIZED, ErrorType.NOT_READY, ErrorType.INTERNAL),
    summary="The model served and what its scores mean (calibrated probability or not).",
)
async def info(request: Request) -> Response:
    return JSONResponse(_service(request).describe())


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}
    | error_responses(ErrorType.UNAUTHORIZED, ErrorType.INTERNAL),
    summary="Prometheus metrics.",
)
async def metrics(request: Request) -> Response:
    registry = _service(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
