"""The admission gate: a scoring request is admitted, or refused with 503, before the framework
parses its body (refusing must cost less than the work it spares, or an overload feeds itself).

It meets a request twice. When its headers arrive, it is refused if no room at all is left (or
the service drains, or its engine stalled). Then the gate reads the body itself, and the moment
its last byte arrives a fast parse (msgspec, the items left undecoded) counts the passages it
lists, reads its model and priority, and acquires a permit for them, of that priority and for
the request's API key (crossrank.core.admission), or refuses it. So a refusal costs neither
the framework's routing nor the strict parse nor the validation of its body, and requests
arriving together are admitted in the order their bodies complete, each against the
room the ones before it took. The permit reaches the route in the request's scope
(:func:`request_permit`), and the route hands it to the pipeline as an argument. A body not
sent as JSON, or one the fast parse cannot count, goes on without one: the strict parser says
what is wrong with it, or the pipeline's permit grows from nothing, judged the same way.

Before all that, a key that has spent its budget of invalid requests
(crossrank.http.invalid_budget) is refused (429) from its headers, and every answer the gate
passes on is charged to that budget by its status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crossrank.core.admission import Permit, Priority
from crossrank.core.errors import InvalidInput, ServiceError
from crossrank.core.served import ServedModel
from crossrank.core.service import Service
from crossrank.http.context import record_of
from crossrank.http.invalid_budget import InvalidBudget
from crossrank.http.json_body import is_json
from crossrank.http.schemas import Listed, listed_items

PERMIT = "crossrank_permit"  # the gate's (model, permit) in scope["state"]
PRIORITY_HEADER = "X-Crossrank-Priority"
PRIORITIES = frozenset(p.value for p in Priority)


def request_priority(scope: Scope, sent: str | None) -> Priority:
    """The priority the body names (``sent``), else the header's, else interactive; a header
    naming none is a 422 (the body's field is the schema's to judge)."""
    if sent is None:
        header = dict(scope["headers"]).get(PRIORITY_HEADER.lower().encode())
        if header is None:
            return Priority.INTERACTIVE
        sent = header.decode("latin-1").strip().lower()
        if sent not in PRIORITIES:
            raise InvalidInput("must be interactive or batch", PRIORITY_HEADER)
    return Priority(sent)


def request_permit(scope: Scope, served: ServedModel, priority: Priority) -> Permit:
    """The permit the gate acquired for this request from ``served``'s admission, else one
    holding no room yet, which the pipeline grows to the request's bound (or is refused)."""
    model, held = scope.get("state", {}).get(PERMIT, (None, None))
    if model is served and held.priority is priority:
        return held
    record = record_of(scope)
    return served.admission.acquire(0, priority, record.tenant if record else None)


class AdmissionGateMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        paths: Collection[str],
        service: Service,
        max_passages: int,
        invalid: InvalidBudget,
        respond: Callable[[ServiceError, Scope], Response],
    ) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.service = service
        self.max_passages = max_passages
        self.invalid = invalid
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        record = record_of(scope)
        tenant = record.tenant if record is not None else None
        spent = self.invalid.refusal(tenant)
        if spent is not None:
            # Its body is never parsed; read first only where the connection closes after the
            # answer (see below).
            if not _kept_alive(scope, dict(scope["headers"])):
                await _Body.read(receive)
            await self.respond(spent, scope)(scope, receive, send)
            return
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._admit(scope, receive, watched)
        finally:
            self.invalid.charge(tenant, status)

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        error = self.service.admission_refusal() if _kept_alive(scope, headers) else None
        if error is not None:
            # uvicorn reads and discards the unread body, keeping the connection. It closes one
            # that is not kept alive right after the answer, and closing on unread data resets
            # the connection, which can destroy the answer before the client reads it: such a
            # request is judged when its body is in.
            await self.respond(error, scope)(scope, receive, send)
            return
        body = await _Body.read(receive)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        listed = listed_items(body.data) if body.complete and is_json(content_type) else None
        served = self._model(listed)
        priority = _priority(scope, listed)
        # Over max_passages the route's 422 says why; a 503 would invite retries. A model not
        # served is the route's 404, a priority not known its 422.
        if (
            listed is None
            or served is None
            or priority is None
            or not 0 < listed.items <= self.max_passages
        ):
            await self.app(scope, body.replay(receive), send)
            return
        record = record_of(scope)
        tenant = None
        if record is not None:
            record.model, record.priority, tenant = served.name, priority, record.tenant
        try:
            permit = served.admission.acquire(listed.items, priority, tenant)
            if record is not None:
                record.admitted_at = time.monotonic()
        except ServiceError as refused:
            await self.respond(refused, scope)(scope, receive, send)
            return
        async with permit:
            scope.setdefault("state", {})[PERMIT] = (served, permit)
            await self.app(scope, body.replay(receive), send)

    def _model(self, listed: Listed | None) -> ServedModel | None:
        if listed is None:
            return None
        try:
            return self.service.resolve(listed.model)
        except ServiceError:
            return None


def _priority(scope: Scope, listed: Listed | None) -> Priority | None:
    """The request's priority, or None when it names none known (the route's 422)."""
    if listed is None or (listed.priority is not None and listed.priority not in PRIORITIES):
        return None
    try:
        return request_priority(scope, listed.priority)
    except ServiceError:
        return None


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
