"""The service's failures, as plain domain errors: no web types here (crossrank.http.errors maps
each to its HTTP status and body, in one place)."""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    """Every kind of failure a client can be told of (the ``type`` of an error body)."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    BODY_TOO_LARGE = "body_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    QUEUE_FULL = "queue_full"
    KEY_OVER_SHARE = "key_over_share"
    TOO_MANY_INVALID = "too_many_invalid"
    NOT_READY = "not_ready"
    SHUTTING_DOWN = "shutting_down"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    ENGINE_FAILURE = "engine_failure"
    ENGINE_STALLED = "engine_stalled"
    INTERNAL = "internal"


class ServiceError(Exception):
    """A failure to tell the client: its type, a message for people, and the request field at
    fault when there is one."""

    def __init__(
        self,
        type_: ErrorType,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s  # when a retry could succeed, where known


class InvalidInput(ServiceError):
    """A scoring request the model cannot take as sent. ``path`` is where the fault lies, with
    the candidates' list named ``passages`` whatever a route calls it: ``("passages", 3)``,
    ``("query",)``; the HTTP layer spells it as the route does (``documents[3]``)."""

    def __init__(self, reason: str, *path: str | int) -> None:
        super().__init__(ErrorType.INVALID_REQUEST, f"{spell(path)}: {reason}", field=spell(path))
        self.reason = reason
        self.path = path


def spell(path: tuple[str | int, ...], items: str = "passages") -> str:
    """('passages', 3) -> 'passages[3]'; the list renamed to ``items``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            part = items if part == "passages" and not text else part
            text += f".{part}" if text else part
    return text


def engine_stalled() -> ServiceError:
    return ServiceError(
        ErrorType.ENGINE_STALLED,
        "the model has not answered a batch within its time bound: retry on another replica",
    )


def invalid(message: str, field: str) -> ServiceError:
    return ServiceError(ErrorType.INVALID_REQUEST, message, field=field)
