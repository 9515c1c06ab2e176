"""What one HTTP request is: its id, the figures its access line reports, and the queue room
admission reserved for it before its body was parsed.

Bound in a context variable by the outermost middleware, so that everything running for the
request (routes, the reranker, error responses, log records) finds it without being passed it.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crossrank.batcher import Reservation

# A client's X-Request-ID is kept when it is short and plain (it ends up in logs and headers);
# anything else is replaced by a generated id.
SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclass(slots=True)
class RequestRecord:
    id: str
    passages: int | None = None
    tokens: int | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None
    # Reserved by the admission gate (crossrank.middleware) from the passages the body lists;
    # the reranker takes it over, and the gate gives back whatever nobody took.
    reservation: Reservation | None = None


_current: ContextVar[RequestRecord | None] = ContextVar("crossrank_request", default=None)


def request_id(sent: bytes | None) -> str:
    """The client's id if it is sane, else a new one."""
    if sent is not None:
        text = sent.decode("latin-1")
        if SANE_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


def bind(record: RequestRecord) -> Token[RequestRecord | None]:
    return _current.set(record)


def unbind(token: Token[RequestRecord | None]) -> None:
    _current.reset(token)


def current() -> RequestRecord | None:
    return _current.get()
