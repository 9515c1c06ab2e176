"""The one error type of the service and the one place that maps it to HTTP.

Every failure a client can see is a :class:`ServiceError` with a :class:`ErrorType`; the body is
always ``{"error": {"type", "message", "field"?, "id"}}``, ``id`` being the request's id (its
``X-Request-ID`` header and the key to its log lines).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from crossrank.request_context import current
from crossrank.responses import JSONResponse


class ErrorType(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    BODY_TOO_LARGE = "body_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    QUEUE_FULL = "queue_full"
    NOT_READY = "not_ready"
    SHUTTING_DOWN = "shutting_down"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    ENGINE_FAILURE = "engine_failure"
    ENGINE_STALLED = "engine_stalled"
    INTERNAL = "internal"


STATUS: dict[ErrorType, int] = {
    ErrorType.INVALID_REQUEST: 422,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.BODY_TOO_LARGE: 413,
    ErrorType.REQUEST_TIMEOUT: 408,
    ErrorType.NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.QUEUE_FULL: 503,
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
        ErrorType.NOT_READY,
        ErrorType.SHUTTING_DOWN,
        ErrorType.ENGINE_STALLED,
    }
)


class ServiceError(Exception):
    def __init__(
        self,
        type_: ErrorType,
        message: str,
        *,
        field: str | None = None,
        error_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        self.field = field
        self.error_id = error_id

    @property
    def status(self) -> int:
        return STATUS[self.type]

    def body(self, request_id: str | None) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type.value, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if request_id is not None:
            error["id"] = request_id
        return {"error": error}


def invalid(message: str, field: str) -> ServiceError:
    return ServiceError(ErrorType.INVALID_REQUEST, message, field=field)


def error_response(error: ServiceError, retry_after_s: int) -> JSONResponse:
    headers = {}
    if error.type in RETRYABLE:
        headers["Retry-After"] = str(retry_after_s)
    if error.type is ErrorType.REQUEST_TIMEOUT:
        # The rest of the body may still be trickling in: end the connection, not just the
        # request, or the server would go on reading it.
        headers["Connection"] = "close"
    if error.type is ErrorType.UNAUTHORIZED:
        # RFC 6750: the scheme the client must use.
        headers["WWW-Authenticate"] = 'Bearer realm="crossrank"'
    record = current()
    body = error.body(record.id if record is not None else None)
    return JSONResponse(body, status_code=error.status, headers=headers)
