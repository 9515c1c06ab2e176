"""The one map from the service's errors to HTTP: status, headers and the one error body.

Every failure a client sees is rendered here, whoever met it (a route, a middleware, the
framework's validation): ``{"error": {"type", "message", "field"?, "id"}, "message", "detail"}``,
``id`` being the request's id (its ``X-Request-ID`` header and the key to its log lines), and
the message repeated at the top level for the clients that read it there (Cohere's SDK reads
``message``; FastAPI's and Jina-style clients read ``detail``). Refusals are counted here too,
once each, by reason.
"""

from __future__ import annotations

import math

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import Scope

from crossrank.core.errors import ErrorType, InvalidInput, ServiceError, invalid, spell
from crossrank.http.context import record_of
from crossrank.http.responses import JSONResponse
from crossrank.ops.metrics import Metrics

STATUS: dict[ErrorType, int] = {
    ErrorType.INVALID_REQUEST: 422,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.BODY_TOO_LARGE: 413,
    ErrorType.REQUEST_TIMEOUT: 408,
    ErrorType.NOT_FOUND: 404,
    ErrorType.MODEL_NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.QUEUE_FULL: 503,
    ErrorType.KEY_OVER_SHARE: 429,
    ErrorType.TOO_MANY_INVALID: 429,
    ErrorType.NOT_READY: 503,
    ErrorType.SHUTTING_DOWN: 503,
    ErrorType.DEADLINE_EXCEEDED: 504,
    ErrorType.ENGINE_FAILURE: 500,
    ErrorType.ENGINE_STALLED: 503,
    ErrorType.INTERNAL: 500,
}

# Types a client should retry after a pause: they get a Retry-After header.
RETRYABLE = frozenset(
    {
        ErrorType.QUEUE_FULL,
        ErrorType.KEY_OVER_SHARE,
        ErrorType.TOO_MANY_INVALID,
        ErrorType.NOT_READY,
        ErrorType.SHUTTING_DOWN,
        ErrorType.ENGINE_STALLED,
    }
)

# crossrank_rejected_requests' reason for each type counted as a refusal.
REJECTION = {
    ErrorType.QUEUE_FULL: "queue_full",
    ErrorType.KEY_OVER_SHARE: "key_over_share",
    ErrorType.TOO_MANY_INVALID: "too_many_invalid",
    ErrorType.NOT_READY: "not_ready",
    ErrorType.SHUTTING_DOWN: "shutting_down",
    ErrorType.ENGINE_STALLED: "engine_stalled",
    ErrorType.INVALID_REQUEST: "invalid",
    ErrorType.BODY_TOO_LARGE: "too_large",
    ErrorType.REQUEST_TIMEOUT: "body_timeout",
}

HTTP_ERROR_TYPES = {
    404: ErrorType.NOT_FOUND,
    405: ErrorType.METHOD_NOT_ALLOWED,
    408: ErrorType.REQUEST_TIMEOUT,
    413: ErrorType.BODY_TOO_LARGE,
}

# The shapes a scoring body may take at /rerank (crossrank's own, Cohere's): names pydantic puts
# in an error's location, which a field name leaves out.
BODY_SHAPES = ("crossrank", "cohere")


def _field(loc: tuple) -> str | None:
    """('body', 'passages', 3) -> 'passages[3]'."""
    parts = [p for p in loc if p != "body"]
    if parts and parts[0] in BODY_SHAPES:
        parts = parts[1:]
    return spell(tuple(parts), items="passages") if parts else None


def validation_error(exc: RequestValidationError) -> ServiceError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error") or first.get("msg")
        return invalid(f"the body is not valid JSON: {reason}", "body")
    field = _field(tuple(first.get("loc", ()))) or "body"
    if first.get("type") == "missing":
        return invalid(f"{field} is required", field)
    return invalid(f"{field}: {first.get('msg')}", field)


def http_error(exc: HTTPException) -> ServiceError:
    """The framework's own errors (404, 405, the body limit's 413 and 408) as the service's."""
    error_type = HTTP_ERROR_TYPES.get(exc.status_code)
    if error_type is None:
        error_type = ErrorType.INVALID_REQUEST if exc.status_code < 500 else ErrorType.INTERNAL
    return ServiceError(error_type, str(exc.detail))


class ErrorResponder:
    """Renders (and counts) every error response of the app."""

    def __init__(self, metrics: Metrics, retry_after_s: int, retry_after_max_s: int) -> None:
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self._retry_after_max_s = retry_after_max_s

    def __call__(self, error: ServiceError, scope: Scope) -> JSONResponse:
        record = record_of(scope)
        reason = REJECTION.get(error.type)
        if reason is not None:
            model = record.model if record is not None else ""
            self._metrics.rejected_requests.labels(reason, model).inc()
        body: dict[str, str] = {"type": error.type.value, "message": error.message}
        if isinstance(error, InvalidInput):
            field = spell(error.path, record.items if record is not None else "passages")
            body["message"] = f"{field}: {error.reason}"
            body["field"] = field
        elif error.field is not None:
            body["field"] = error.field
        if record is not None:
            body["id"] = record.id
        message = body["message"]
        return JSONResponse(
            {"error": body, "message": message, "detail": message},
            status_code=STATUS[error.type],
            headers=self._headers(error),
        )

    def _retry_after(self, error: ServiceError) -> int:
        """Whole seconds: the error's own estimate (the queue's drain time) rounded up and
        bounded, else the configured pause."""
        if error.retry_after_s is None:
            return self._retry_after_s
        return max(1, min(self._retry_after_max_s, math.ceil(error.retry_after_s)))

    def _headers(self, error: ServiceError) -> dict[str, str]:
        headers = {}
        if error.type in RETRYABLE:
            headers["Retry-After"] = str(self._retry_after(error))
        if error.type is ErrorType.REQUEST_TIMEOUT:
            # The rest of the body may still be trickling in: end the connection, not just the
            # request, or the server would go on reading it.
            headers["Connection"] = "close"
        if error.type is ErrorType.UNAUTHORIZED:
            # RFC 6750: the scheme the client must use.
            headers["WWW-Authenticate"] = 'Bearer realm="crossrank"'
        return headers
