"""ASGI middleware: request ids and the access log, API keys, the request-body size limit,
admission before the body is read, and the request-duration metric."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Collection

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crossrank.batcher import Batcher
from crossrank.errors import ErrorType, ServiceError, error_response
from crossrank.json_body import is_json
from crossrank.metrics import Metrics
from crossrank.request_context import RequestRecord, bind, current, request_id, unbind
from crossrank.schemas import listed_items

log = logging.getLogger(__name__)
access_log = logging.getLogger("crossrank.access")


class RequestContextMiddleware:
    """Outermost: gives each request its id (the client's ``X-Request-ID`` if sane, else a new
    one), returns it on every response, turns any exception that escaped the app into the one
    error body (500 ``internal``, logged with its traceback, never sent), and writes one access
    line per request."""

    def __init__(self, app: ASGIApp, access: bool, retry_after_s: int) -> None:
        self.app = app
        self.access = access
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id(dict(scope["headers"]).get(b"x-request-id")))
        token = bind(record)
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
            await error_response(error, self.retry_after_s)(scope, receive, send_with_id)
        finally:
            if self.access:
                access_log.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"fields": self._fields(scope, record, status, started)},
                )
            unbind(token)

    @staticmethod
    def _fields(scope: Scope, record: RequestRecord, status: int, started: float) -> dict:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        return {
            "method": scope["method"],
            "route": scope["path"],
            "status": status,
            "passages": record.passages,
            "tokens": record.tokens,
            "queue_ms": ms(record.queue_ms),
            "inference_ms": ms(record.inference_ms),
            "total_ms": ms(1000 * (time.monotonic() - started)),
        }


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer KEY`` names one of ``keys``; ``open_paths`` are exempt.

    Every key is compared, in constant time, whatever matched before: the time taken tells a
    caller nothing about how much of a key it guessed, nor which key it was near. The key never
    reaches a log or a metric: failures are counted by reason only.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: Collection[str],
        open_paths: Collection[str],
        metrics: Metrics,
        retry_after_s: int,
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = frozenset(open_paths)
        self.metrics = metrics
        self.retry_after_s = retry_after_s

    def _failure(self, header: bytes | None) -> str | None:
        """Why ``header`` does not authorise the request, or None when it does."""
        if header is None:
            return "missing"
        scheme, _, key = header.partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key:
            return "malformed"
        matched = False
        for known in self.keys:
            matched |= hmac.compare_digest(known, key)
        return None if matched else "wrong_key"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        reason = self._failure(header)
        if reason is None:
            await self.app(scope, receive, send)
            return
        self.metrics.auth_failures.labels(reason).inc()
        message = {
            "missing": "this server needs an API key: send 'Authorization: Bearer KEY'",
            "malformed": "the Authorization header must be 'Bearer KEY'",
            "wrong_key": "the API key is not valid",
        }[reason]
        error = ServiceError(ErrorType.UNAUTHORIZED, message)
        await error_response(error, self.retry_after_s)(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once from Content-Length, else while it streams;
    408 for a body not all in within ``timeout_s`` of the request's start (a client trickling
    it would otherwise hold its connection and its request for ever)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics

    def _error(self) -> ServiceError:
        return ServiceError(
            ErrorType.BODY_TOO_LARGE,
            f"the request body exceeds this server's limit of {self.max_bytes} bytes",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.metrics.rejected_requests.labels("too_large").inc()
            await error_response(self._error(), retry_after_s=0)(scope, receive, send)
            return
        seen = 0
        complete = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete:
                # After the body only the disconnect is left, which may come at any time.
                return await receive()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                self.metrics.rejected_requests.labels("body_timeout").inc()
                raise HTTPException(
                    408, f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing unchanged, and the
                    # app's handler turns it into the body_too_large error.
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited_receive, send)


class AdmissionGateMiddleware:
    """Admission meets a scoring request twice before the app sees it. When its headers
    arrive, it is refused if no room at all is left (or the service drains, or its engine
    stalled). Then the gate reads the body itself, and the moment its last byte arrives a fast
    parse (msgspec, the items left undecoded) counts the passages it lists and reserves queue
    room for them (:meth:`Batcher.reserve`), or refuses it with that 503; the reranker takes
    the reservation over (resized to the request's exact bound) and this gives back whatever
    nobody took (a body that fails validation). So a refusal costs neither the framework's
    routing nor the strict parse nor the validation of its body, and requests arriving together
    are admitted in the order their bodies complete, each against the room the ones before it
    took. A body not sent as JSON, or one the fast parse cannot count, goes on unreserved: the
    strict parser says what is wrong with it, or the reranker reserves for it as before."""

    def __init__(
        self,
        app: ASGIApp,
        paths: Collection[str],
        batcher: Callable[[], Batcher | None],
        max_passages: int,
        respond: Callable[[ServiceError], Response],
    ) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.batcher = batcher  # None until the service is ready (the route then says so)
        self.max_passages = max_passages
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        batcher = self.batcher()
        record = current()
        if (
            batcher is None
            or record is None
            or scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in self.paths
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        error = batcher.refusal() if _kept_alive(scope, headers) else None
        if error is not None:
            # uvicorn reads and discards the unread body, keeping the connection. It closes one
            # that is not kept alive right after the answer, and closing on unread data resets
            # the connection, which can destroy the answer before the client reads it: such a
            # request is judged when its body is in.
            await self.respond(error)(scope, receive, send)
            return
        body = await _Body.read(receive)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        listed = listed_items(body.data) if body.complete and is_json(content_type) else None
        # Over max_passages the route's 422 says why; a 503 would invite retries.
        if listed and listed <= self.max_passages:
            try:
                record.reservation = batcher.reserve(listed)
            except ServiceError as refused:
                await self.respond(refused)(scope, receive, send)
                return
        try:
            await self.app(scope, body.replay(receive), send)
        finally:
            if record.reservation is not None:
                batcher.release(record.reservation)
                record.reservation = None


class _Body:
    """A request body read ahead of the app, and how it ended: complete, cut short by the
    client (``http.disconnect``), or by an exception from the receive chain (the body limit's
    413 and 408), which the app's own read raises again so that its handler answers it."""

    def __init__(self, data: bytes, end: Message | None, failure: Exception | None) -> None:
        self.data = data
        self.end = end  # the message after the body's bytes when it was not a body's last
        self.failure = failure

    @property
    def complete(self) -> bool:
        return self.end is None and self.failure is None

    @classmethod
    async def read(cls, receive: Receive) -> _Body:
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return cls(b"".join(chunks), message, None)
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return cls(b"".join(chunks), None, None)
        except HTTPException as failure:
            return cls(b"".join(chunks), None, failure)

    def replay(self, receive: Receive) -> Receive:
        """A receive that gives the app the body as one message, then how it ended, then
        whatever ``receive`` gives (the disconnect that a route may wait for)."""
        pending: list[Message] = [
            {"type": "http.request", "body": self.data, "more_body": not self.complete}
        ]
        if self.end is not None:
            pending.append(self.end)
        failure = self.failure

        async def replayed() -> Message:
            nonlocal failure
            if pending:
                return pending.pop(0)
            if failure is not None:
                raised, failure = failure, None
                raise raised
            return await receive()

        return replayed


def _kept_alive(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """Whether the connection outlives this request (HTTP/1.1 without ``Connection: close``)."""
    if scope.get("http_version") == "1.0":
        return False
    connection = headers.get(b"connection", b"")
    return b"close" not in connection.lower()


class RequestMetricsMiddleware:
    """``crossrank_request_duration_seconds{endpoint, status}`` for the rerank endpoints."""

    def __init__(self, app: ASGIApp, endpoints: dict[str, str], metrics: Metrics) -> None:
        self.app = app
        self.endpoints = endpoints  # path -> endpoint label
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = "500"

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.request_duration.labels(endpoint, status).observe(
                time.monotonic() - started
            )
