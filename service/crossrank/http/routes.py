"""HTTP routes: parse, call the pipeline, shape the answer. Nothing else lives here."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.responses import PlainTextResponse, Response

from crossrank.core.errors import ErrorType
from crossrank.core.pipeline import ScoreRequest
from crossrank.core.ranking import Ranked, Trace
from crossrank.core.served import ServedModel
from crossrank.core.service import Service
from crossrank.http.context import record_of
from crossrank.http.gate import request_permit, request_priority
from crossrank.http.json_body import StrictJSONRoute
from crossrank.http.schemas import (
    CohereRerankRequest,
    CohereResponse,
    CohereResult,
    HealthResponse,
    InfoResponse,
    ModelList,
    ReadyResponse,
    RerankBody,
    RerankResponse,
    RerankResult,
    Usage,
    cohere_document,
    document_texts,
    error_responses,
)

# Set on an answer that a budget cut short (crossrank.features.budget).
PARTIAL_HEADER = "X-Crossrank-Partial"

# nginx's code for "client closed request": logged and counted, never seen by the client.
CLIENT_CLOSED = 499

router = APIRouter(route_class=StrictJSONRoute)

# What a rerank route can answer besides 200 (documented in the OpenAPI, checked by fuzzing).
RERANK_ERRORS = error_responses(
    ErrorType.UNAUTHORIZED,
    ErrorType.MODEL_NOT_FOUND,
    ErrorType.REQUEST_TIMEOUT,
    ErrorType.BODY_TOO_LARGE,
    ErrorType.INVALID_REQUEST,
    ErrorType.ENGINE_FAILURE,
    ErrorType.INTERNAL,
    ErrorType.QUEUE_FULL,
    ErrorType.KEY_OVER_SHARE,
    ErrorType.TOO_MANY_INVALID,
    ErrorType.NOT_READY,
    ErrorType.SHUTTING_DOWN,
    ErrorType.ENGINE_STALLED,
    ErrorType.DEADLINE_EXCEEDED,
)


def _service(request: Request) -> Service:
    return request.app.state.service


def _model(request: Request, name: str | None) -> ServedModel:
    """The model the request names (crossrank.core.service.Service.resolve), kept on its
    record for its metrics' label."""
    served = _service(request).resolve(name)
    record = record_of(request.scope)
    if record is not None:
        record.model = served.name
    return served


def _json(
    body: BaseModel, status: int = 200, exclude_none: bool = True, partial: bool = False
) -> Response:
    """A response model rendered by pydantic's serialiser (unset optional fields left out); a
    partial answer (a budget passed) says so in a header too."""
    headers = {PARTIAL_HEADER: "true"} if partial else None
    return Response(
        body.model_dump_json(exclude_none=exclude_none, exclude_unset=not exclude_none),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def _score(
    request: Request, job: ScoreRequest, served: ServedModel, sent_priority: str | None
) -> Ranked | None:
    """Score ``job`` with ``served`` on the request's permit, of the priority the body
    (``sent_priority``) or header names; None if the client went away first (its queued pairs
    are then dropped). The body has been read, so the next ASGI message is the disconnect."""
    priority = request_priority(request.scope, sent_priority)
    pipeline = served.require_ready()

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    record = record_of(request.scope)
    trace = Trace()
    if record is not None:
        trace, record.priority = record.trace, priority
    async with request_permit(request.scope, served, priority) as permit:
        task = asyncio.ensure_future(pipeline.score(job, permit, trace))
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
    response_model=RerankResponse | CohereResponse,
    responses=RERANK_ERRORS,
    summary="Score passages against a query and return them best first (a body in Cohere's "
    "shape, with documents, is answered in Cohere's shape).",
)
async def rerank(body: RerankBody, request: Request) -> Response:
    if isinstance(body, CohereRerankRequest):
        return await _cohere_answer(body, request)
    served = _model(request, body.model)
    texts = document_texts(body.passages, body.rank_fields, "passages")
    ranked = await _score(request, body.job(texts), served, body.priority)
    if ranked is None:
        return Response(status_code=CLIENT_CLOSED)
    results = [
        _result(ranked, i, score, texts[i] if body.return_passages else None)
        for i, score in ranked.best(body.top_k, body.min_score)
    ]
    counts = {"pairs": ranked.pairs, "chunks": ranked.chunks, "tokens": ranked.tokens}
    if ranked.scored is not None:
        counts |= {"scored": ranked.pairs - ranked.unscored, "unscored": ranked.unscored}
    usage = Usage(**counts, truncated=ranked.truncated)
    answer = RerankResponse(results=results, model=served.name, usage=usage)
    # Only what applies is set: an unscored passage's score is null, not left out.
    return _json(answer, exclude_none=False, partial=ranked.unscored > 0)


def _result(ranked: Ranked, index: int, score: float, passage: str | None) -> RerankResult:
    fields: dict[str, Any] = {"index": index, "score": score if ranked.is_scored(index) else None}
    if passage is not None:
        fields["passage"] = passage
    if ranked.spans is not None:
        fields["span"] = ranked.span(index)
    if ranked.scored is not None:
        fields["scored"] = ranked.is_scored(index)
    return RerankResult(**fields)


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
    return await _cohere_answer(body, request)


async def _cohere_answer(body: CohereRerankRequest, request: Request) -> Response:
    record = record_of(request.scope)
    if record is not None:
        record.items = "documents"
    served = _model(request, body.model)
    texts = document_texts(body.documents, body.rank_fields, "documents")
    ranked = await _score(request, body.job(texts), served, body.priority)
    if ranked is None:
        return Response(status_code=CLIENT_CLOSED)
    results = [
        CohereResult(
            index=i,
            # Cohere's clients require a number: 0 for a passage the budget left unscored.
            relevance_score=score if ranked.is_scored(i) else 0.0,
            scored=None if ranked.scored is None else ranked.is_scored(i),
            document=cohere_document(body.documents[i]) if body.return_documents else None,
            span=ranked.span(i),
        )
        for i, score in ranked.best(body.top_n, body.min_score)
    ]
    usage: dict[str, int] = {"total_tokens": ranked.tokens}
    if ranked.scored is not None:
        usage |= {"scored": ranked.pairs - ranked.unscored, "unscored": ranked.unscored}
    return _json(
        CohereResponse(
            id=str(uuid.uuid4()),
            results=results,
            meta={
                "api_version": {"version": "2"},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": ranked.tokens, "output_tokens": 0},
            },
            model=served.name,
            usage=usage,
        ),
        partial=ranked.unscored > 0,
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
        return _json(HealthResponse(status="ok"))
    return _json(HealthResponse(status="stuck", reason=reason), status=503)


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
        return _json(ReadyResponse(status="ready"))
    return _json(ReadyResponse(status="not ready", reason=reason), status=503)


@router.get(
    "/info",
    response_model=InfoResponse,
    responses=error_responses(ErrorType.UNAUTHORIZED, ErrorType.NOT_READY, ErrorType.INTERNAL),
    summary="The default model and what its scores mean (calibrated probability or not); "
    "every model served under models.",
)
async def info(request: Request) -> Response:
    return _json(InfoResponse(**_service(request).describe()), exclude_none=False)


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=error_responses(ErrorType.UNAUTHORIZED, ErrorType.INTERNAL),
    summary="The models served, by every name a request may use (OpenAI's list shape).",
)
async def models(request: Request) -> Response:
    return _json(ModelList(**_service(request).listing()))


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
