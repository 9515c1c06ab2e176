"""What one HTTP request is to the service: its id, its trace (what the access line reports),
and the outermost middleware that gives it both.

The record lives in the request's ASGI scope (``scope["state"]``, which Starlette shows routes
as ``request.state``): the route hands its trace to the pipeline, which fills it in, and this
middleware writes the access line and the request's duration metric when the answer is sent.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crossrank.core.errors import ErrorType, ServiceError
from crossrank.core.ranking import Trace
from crossrank.ops.logs import current_request_id

if TYPE_CHECKING:
    from crossrank.http.tracing import Tracing
from crossrank.ops.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("crossrank.access")

# A client's X-Request-ID is kept when it is short and plain (it ends up in logs and headers);
# anything else is replaced by a generated id.
SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

RECORD = "crossrank_record"  # the record's key in scope["state"]


@dataclass(slots=True)
class RequestRecord:
    id: str
    trace: Trace = field(default_factory=Trace)
    # What the request calls its candidates (Cohere's shape: documents), for its errors' fields.
    items: str = "passages"
    model: str = ""  # the model serving it, once known: its metrics' label
    priority: str = "interactive"  # its class, once known: its duration metric's label
    # Which API key sent it (its position among the keys, never the key): admission's fair
    # share is per key.
    tenant: str | None = None
    admitted_at: float | None = None  # when the gate acquired its room (monotonic)


def request_id(sent: bytes | None) -> str:
    """The client's id if it is sane, else a new one."""
    if sent is not None:
        text = sent.decode("latin-1")
        if SANE_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


def record_of(scope: Scope) -> RequestRecord | None:
    return scope.get("state", {}).get(RECORD)


class RequestContextMiddleware:
    """Outermost: gives each request its id (the client's ``X-Request-ID`` if sane, else a new
    one) and returns it on every response; turns any exception that escaped the app into the
    one error body (500 ``internal``, logged with its traceback, never sent); writes one access
    line per request and, for the scoring endpoints, its duration metric."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        access: bool,
        endpoints: dict[str, str],
        metrics: Metrics,
        respond: Callable[[ServiceError, Scope], Response],
        tracing: Tracing | None = None,
    ) -> None:
        self.app = app
        self.access = access
        self.endpoints = endpoints  # path -> endpoint label of the duration metric
        self.metrics = metrics
        self.respond = respond
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id(dict(scope["headers"]).get(b"x-request-id")))
        scope.setdefault("state", {})[RECORD] = record
        token = current_request_id.set(record.id)
        started = time.monotonic()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", record.id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error")
            if status:
                raise  # the answer had begun: all that is left is to drop the connection
            error = ServiceError(ErrorType.INTERNAL, f"internal error (request id {record.id})")
            await self.respond(error, scope)(scope, receive, send_with_id)
        finally:
            ended = time.monotonic()
            self._observe(scope, record, status, ended - started)
            if self.tracing is not None and scope["path"] in self.endpoints:
                self.tracing.record(scope, record, status or 500, started, ended)
            current_request_id.reset(token)

    def _observe(self, scope: Scope, record: RequestRecord, status: int, seconds: float) -> None:
        endpoint = self.endpoints.get(scope["path"])
        if endpoint is not None:
            # No answer sent: the request was cancelled, as uvicorn does to a closed connection.
            label = str(status or 500)
            self.metrics.request_duration.labels(
                endpoint, label, record.model, record.priority
            ).observe(seconds)
        if not self.access:
            return

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        trace = record.trace
        fields = {
            "method": scope["method"],
            "route": scope["path"],
            "status": status,
            "passages": trace.passages,
            "tokens": trace.tokens,
            "queue_ms": ms(trace.queue_ms),
            "inference_ms": ms(trace.inference_ms),
            "total_ms": ms(1000 * seconds),
        }
        access_log.info(
            "%s %s %s", scope["method"], scope["path"], status, extra={"fields": fields}
        )
