"""Request and response bodies of the HTTP API (validation lives here, routes stay thin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    WithJsonSchema,
    model_validator,
)

from crossrank.core.errors import ErrorType, invalid
from crossrank.core.pipeline import ScoreRequest
from crossrank.http.errors import BODY_SHAPES, STATUS


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
PriorityName = Literal["interactive", "batch"]
BUDGET_MS = Field(
    default=None,
    ge=1,
    le=3_600_000,
    description="Latency budget from arrival: by then the answer is a 200 with what was scored "
    "(scored passages first, by score, then the rest in the order sent, each with scored "
    "true/false; usage.scored/unscored). Default: the server's default_budget_ms, if any.",
)
PRIORITY = Field(
    default=None,
    description="interactive (the default) or batch: batch work fills idle capacity and has its "
    "own admission bound. Overrides the X-Crossrank-Priority header.",
)
MODEL = Field(
    default=None,
    min_length=1,
    description="The model to rank with, by name or alias (GET /v1/models); with one model "
    "served any name is it, with several none is the default.",
)
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


def _document(value: object) -> str | dict[str, Any]:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        # Its fields are checked against rank_fields by document_texts, which names them.
        return value
    raise ValueError("must be a string or an object of fields")


# A passage as text, or (as Cohere and Jina accept) an object: {"text": ...} or fields named
# by rank_fields.
Document = Annotated[
    str | dict[str, Any],
    PlainValidator(_document),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1}, {"type": "object"}]}),
]
RankFields = list[Annotated[StrictStr, Field(min_length=1)]] | None
RANK_FIELDS = Field(
    default=None,
    min_length=1,
    description="Object documents: these fields, in this order, each as 'field: value' on its "
    "own line, make the passage text (without it an object's text is its 'text').",
)


def _field_text(document: dict[str, Any], name: str, where: str) -> str:
    field = f"{where}.{name}"
    if name not in document:
        raise invalid(f"{where} has no field {name!r}", field)
    value = document[name]
    if not isinstance(value, str):
        raise invalid(f"{field} is a {type(value).__name__}, not a string", field)
    try:
        return _text(value)
    except ValueError as exc:
        raise invalid(f"{field} {exc}", field) from None


def document_texts(
    documents: list[str | dict[str, Any]], rank_fields: list[str] | None, field: str
) -> list[str]:
    """The text scored for each document; a 422 naming the document and field at fault."""
    texts = []
    for index, document in enumerate(documents):
        where = f"{field}[{index}]"
        if isinstance(document, str):
            texts.append(document)
        elif rank_fields is None:
            texts.append(_field_text(document, "text", where))
        else:
            lines = [f"{name}: {_field_text(document, name, where)}" for name in rank_fields]
            texts.append("\n".join(lines))
    return texts


class _Listed(msgspec.Struct):
    """A scoring body's item lists, each item left unread (msgspec.Raw): their number is all
    admission needs, and a count that skips decoding the strings costs less than a full parse;
    and the model it names."""

    passages: list[msgspec.Raw] | None = None
    documents: list[msgspec.Raw] | None = None
    model: str | None = None
    priority: str | None = None


_listed = msgspec.json.Decoder(_Listed)


class Listed(NamedTuple):
    items: int
    model: str | None
    priority: str | None


def listed_items(body: bytes) -> Listed | None:
    """How many passages (``/rerank``) or documents (the Cohere routes) a JSON body lists,
    before it is validated, and the model and priority it names: a lower bound on the pairs its
    request will hold room for, which admission can judge first (crossrank.http.gate). None
    when the body is not an object with such a list: the strict parser is to say what is wrong
    with it."""
    try:
        listed = _listed.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError included; too deep
        return None
    items = listed.passages if listed.passages is not None else listed.documents
    return None if items is None else Listed(len(items), listed.model, listed.priority)


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _one_shape(cls, value: Any) -> Any:
        if isinstance(value, dict) and "passages" in value and "documents" in value:
            raise ValueError(
                "send passages (crossrank's shape) or documents (Cohere's), not both: the "
                "answer's shape follows the body's"
            )
        return value

    model: StrictStr | None = MODEL
    query: Text
    passages: list[Document] = Field(
        min_length=1,
        description="Candidates to score, 1 to the server's max_passages (1,000): strings, or "
        "objects with rank_fields.",
    )
    rank_fields: RankFields = RANK_FIELDS
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
    budget_ms: StrictInt | None = BUDGET_MS
    priority: PriorityName | None = PRIORITY

    def job(self, texts: list[str]) -> ScoreRequest:
        return ScoreRequest(
            self.query,
            texts,
            raw_scores=self.raw_scores,
            truncate=self.truncate,
            timeout_ms=self.timeout_ms,
            budget_ms=self.budget_ms,
            instruction=self.instruction,
            long_passages=self.long_passages,
            chunk_aggregation=self.chunk_aggregation,
            max_chunks_per_doc=self.max_chunks_per_doc,
        )


class Span(BaseModel):
    """The window of a chunked passage that scored it: its position and characters."""

    chunk: int = Field(description="Window number, from 0.")
    start: int = Field(description="First character of the window in the passage.")
    end: int = Field(description="One past its last character.")


class RerankResult(BaseModel):
    index: int
    score: float | None = Field(description="None: not scored within the request's budget.")
    scored: bool | None = Field(default=None, description="With a budget only.")
    passage: str | None = None
    span: Span | None = Field(default=None, description="With long_passages chunk only.")


class Usage(BaseModel):
    pairs: int = Field(description="Passages scored.")
    chunks: int = Field(description="Pairs sent to the model: windows with chunk, else pairs.")
    tokens: int
    truncated: int = Field(description="Passages (or the query) with text left unscored.")
    scored: int | None = Field(default=None, description="With a budget: passages scored.")
    unscored: int | None = Field(default=None, description="With a budget: passages not.")


class RerankResponse(BaseModel):
    results: list[RerankResult]
    model: str
    usage: Usage


class CohereRerankRequest(BaseModel):
    """Cohere's (and Jina's) rerank body. Fields this server has no use for are accepted and
    ignored, as a drop-in must."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = MODEL
    query: Text
    documents: list[Document] = Field(min_length=1)
    rank_fields: RankFields = RANK_FIELDS
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
    budget_ms: StrictInt | None = BUDGET_MS
    priority: PriorityName | None = PRIORITY

    def job(self, texts: list[str]) -> ScoreRequest:
        """Cohere's semantics: over-long documents are cut, scores are always probabilities."""
        return ScoreRequest(
            self.query,
            texts,
            budget_ms=self.budget_ms,
            instruction=self.instruction,
            max_passage_tokens=self.max_tokens_per_doc,
            long_passages=self.long_passages,
            chunk_aggregation=self.chunk_aggregation,
            max_chunks_per_doc=self.max_chunks_per_doc,
        )


def cohere_document(document: str | dict[str, Any]) -> dict[str, Any]:
    """A document as Cohere returns it: {text} for a string, else the object sent."""
    return {"text": document} if isinstance(document, str) else document


class CohereResult(BaseModel):
    index: int
    relevance_score: float = Field(
        description="0 for a passage not scored within the request's budget (scored false)."
    )
    scored: bool | None = Field(default=None, description="With a budget only.")
    document: dict[str, Any] | None = Field(
        default=None, description="{text} for a string document, else the object sent."
    )
    span: Span | None = Field(default=None, description="With long_passages chunk only.")


class CohereResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: dict
    model: str
    usage: dict


def _body_shape(value: Any) -> str:
    """Cohere's shape when the body lists documents and no passages, else crossrank's."""
    crossrank, cohere = BODY_SHAPES
    if isinstance(value, dict) and "documents" in value and "passages" not in value:
        return cohere
    return crossrank


# What /rerank takes: crossrank's body, or Cohere's (answered in Cohere's shape), as vLLM and
# Infinity accept at /rerank.
RerankBody = Annotated[
    Annotated[RerankRequest, Tag(BODY_SHAPES[0])]
    | Annotated[CohereRerankRequest, Tag(BODY_SHAPES[1])],
    Discriminator(_body_shape),
]


class HealthResponse(BaseModel):
    status: Literal["ok", "stuck"]
    reason: str | None = None


class ModelInfo(BaseModel):
    name: str = Field(description="The name requests use (the model field).")
    aliases: list[str] = Field(description="Other names it answers to.")
    model: str = Field(description="crossrank.json's name.")
    variant: str
    max_length: int
    max_query_tokens: int
    activation: str
    calibrated: bool = Field(description="Whether `score`/`relevance_score` is a probability.")
    score: str = Field(description="What the scores mean, in words.")
    calibration: dict[str, Any] | None = Field(
        default=None, description="crossrank.json's calibration: method, parameters, fit set."
    )
    score_cache_bytes: int = Field(description="The score cache's bound; 0: no cache.")
    long_passages: dict[str, Any] = Field(description="The server's long-passage defaults.")


class InfoResponse(ModelInfo):
    """The default model's description, and every model's."""

    models: list[ModelInfo]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReadyResponse(BaseModel):
    status: Literal["ready", "not ready"]
    reason: str | None = None


class ErrorDetail(BaseModel):
    type: ErrorType
    message: str
    field: str | None = Field(default=None, description="The request field at fault.")
    id: str = Field(description="The request's id, as in its X-Request-ID header and logs.")


class ErrorBody(BaseModel):
    """The one error body of every failure. ``message`` and ``detail`` repeat the error's
    message at the top level, where Cohere's clients (``message``) and FastAPI's and Jina's
    (``detail``) look for it."""

    error: ErrorDetail
    message: str
    detail: str


def error_responses(*types: ErrorType) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that can fail with ``types``, by status."""
    by_status: dict[int, list[str]] = {}
    for error_type in types:
        by_status.setdefault(STATUS[error_type], []).append(error_type.value)
    return {
        status: {"model": ErrorBody, "description": ", ".join(names)}
        for status, names in sorted(by_status.items())
    }
