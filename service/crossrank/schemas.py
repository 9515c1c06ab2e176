"""Request and response bodies of the HTTP API (validation lives here, routes stay thin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from crossrank.errors import STATUS, ErrorType


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON's \ud800-style escapes can spell a lone surrogate, which no tokenizer takes.
        raise ValueError("holds a lone surrogate escape: not Unicode text") from None
    return value


Text = Annotated[StrictStr, AfterValidator(_text)]


LongPassages = Literal["truncate", "chunk"]
ChunkAggregation = Literal["max", "first", "mean"]
LONG_PASSAGES = Field(
    default=None,
    description="truncate: cut a pair to the model's max length; chunk: score overlapping "
    "windows of the passage (on token boundaries) and aggregate. Default: the server's.",
)
CHUNK_AGGREGATION = Field(
    default=None,
    description="A chunked passage's score: max (best window), first or mean over its windows' "
    "logits. Default: the server's.",
)
MAX_CHUNKS_PER_DOC = Field(
    default=None,
    ge=1,
    description="Windows scored per passage at most, from its start. Default: the server's.",
)


def _document_text(value: object) -> object:
    """Cohere and Jina accept a document as a string or as ``{"text": ...}``."""
    if isinstance(value, dict) and "text" in value:
        return value["text"]
    return value


DocumentText = Annotated[Text, BeforeValidator(_document_text)]


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Text
    passages: list[Text] = Field(
        min_length=1, description="Candidates to score, 1 to the server's max_passages (1,000)."
    )
    top_k: StrictInt | None = Field(default=None, ge=1, description="Return only the best k.")
    return_passages: StrictBool = False
    raw_scores: StrictBool = Field(
        default=False,
        description="The logit as score instead of the calibrated probability (or, for a model "
        "without calibration, its activation: see GET /info).",
    )
    min_score: StrictFloat | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Drop results scoring below it, after ranking (compared with the score "
        "returned: the probability, or the logit with raw_scores).",
    )
    truncate: StrictBool = Field(
        default=True, description="Cut over-long pairs to the model's length instead of a 422."
    )
    timeout_ms: StrictInt | None = Field(
        default=None,
        ge=1,
        le=3_600_000,
        description="Deadline from arrival, at most an hour; past it the answer is a 504.",
    )
    instruction: Text | None = Field(
        default=None,
        description="An LLM reranker's instruction in place of its default (a 422 for a model "
        "whose prompt has none).",
    )
    long_passages: LongPassages | None = LONG_PASSAGES
    chunk_aggregation: ChunkAggregation | None = CHUNK_AGGREGATION
    max_chunks_per_doc: StrictInt | None = MAX_CHUNKS_PER_DOC


class Span(BaseModel):
    """The window of a chunked passage that scored it: its position and characters."""

    chunk: int = Field(description="Window number, from 0.")
    start: int = Field(description="First character of the window in the passage.")
    end: int = Field(description="One past its last character.")


class RerankResult(BaseModel):
    index: int
    score: float
    passage: str | None = None
    span: Span | None = Field(default=None, description="With long_passages chunk only.")


class Usage(BaseModel):
    pairs: int = Field(description="Passages scored.")
    chunks: int = Field(description="Pairs sent to the model: windows with chunk, else pairs.")
    tokens: int
    truncated: int = Field(description="Passages (or the query) with text left unscored.")


class RerankResponse(BaseModel):
    results: list[RerankResult]
    model: str
    usage: Usage


class CohereRerankRequest(BaseModel):
    """Cohere's (and Jina's) rerank body. Fields this server has no use for are accepted and
    ignored, as a drop-in must."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    query: Text
    documents: list[DocumentText] = Field(min_length=1)
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    min_score: StrictFloat | None = Field(
        default=None,
        allow_inf_nan=False,
        description="(crossrank extension) drop results whose relevance_score is below it.",
    )
    instruction: Text | None = Field(
        default=None,
        description="(crossrank extension) an LLM reranker's instruction in place of its "
        "default (a 422 for a model whose prompt has none).",
    )
    max_tokens_per_doc: StrictInt | None = Field(
        default=None, ge=1, description="Cut each document to this many tokens first."
    )
    max_chunks_per_doc: StrictInt | None = MAX_CHUNKS_PER_DOC
    long_passages: LongPassages | None = LONG_PASSAGES
    chunk_aggregation: ChunkAggregation | None = CHUNK_AGGREGATION


class CohereDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereDocument | None = None
    span: Span | None = Field(default=None, description="With long_passages chunk only.")


class CohereResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: dict
    model: str
    usage: dict


class HealthResponse(BaseModel):
    status: Literal["ok", "stuck"]
    reason: str | None = None


class InfoResponse(BaseModel):
    model: str
    variant: str
    max_length: int
    max_query_tokens: int
    activation: str
    calibrated: bool = Field(description="Whether `score`/`relevance_score` is a probability.")
    score: str = Field(description="What the scores mean, in words.")
    calibration: dict[str, Any] | None = Field(
        default=None, description="crossrank.json's calibration: method, parameters, fit set."
    )
    long_passages: dict[str, Any] = Field(description="The server's long-passage defaults.")


class ReadyResponse(BaseModel):
    status: Literal["ready", "not ready"]
    reason: str | None = None


class ErrorDetail(BaseModel):
    type: ErrorType
    message: str
    field: str | None = Field(default=None, description="The request field at fault.")
    id: str = Field(description="The request's id, as in its X-Request-ID header and logs.")


class ErrorBody(BaseModel):
    """The one error body of every failure."""

    error: ErrorDetail


def error_responses(*types: ErrorType) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that can fail with ``types``, by status."""
    by_status: dict[int, list[str]] = {}
    for error_type in types:
        by_status.setdefault(STATUS[error_type], []).append(error_type.value)
    return {
        status: {"model": ErrorBody, "description": ", ".join(names)}
        for status, names in sorted(by_status.items())
    }
