"""Request and response bodies of the HTTP API (validation lives here, routes stay thin)."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


Text = Annotated[StrictStr, AfterValidator(_not_blank)]


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
    raw_scores: StrictBool = Field(default=False, description="Logits instead of sigmoid scores.")
    truncate: StrictBool = Field(
        default=True, description="Cut over-long pairs to the model's length instead of a 422."
    )
    timeout_ms: StrictInt | None = Field(
        default=None,
        ge=1,
        le=3_600_000,
        description="Deadline from arrival, at most an hour; past it the answer is a 504.",
    )


class RerankResult(BaseModel):
    index: int
    score: float
    passage: str | None = None


class Usage(BaseModel):
    pairs: int
    tokens: int
    truncated: int


class RerankResponse(BaseModel):
    results: list[RerankResult]
    model: str
    usage: Usage


class CohereRerankRequest(BaseModel):
    """Cohere's (and Jina's) rerank body. Fields this server has no use for (e.g.
    ``max_tokens_per_doc``, ``rank_fields``) are accepted and ignored, as a drop-in must."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    query: Text
    documents: list[DocumentText] = Field(min_length=1)
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False


class CohereDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereDocument | None = None


class CohereResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: dict
    model: str
    usage: dict
