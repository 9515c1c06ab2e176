"""API keys: 401 unless ``Authorization: Bearer KEY`` names a configured key."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from crossrank.core.errors import ErrorType, ServiceError
from crossrank.http.context import record_of
from crossrank.ops.metrics import Metrics

MESSAGES = {
    "missing": "this server needs an API key: send 'Authorization: Bearer KEY'",
    "malformed": "the Authorization header must be 'Bearer KEY'",
    "wrong_key": "the API key is not valid",
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
        *,
        keys: Collection[str],
        open_paths: Collection[str],
        metrics: Metrics,
        respond: Callable[[ServiceError, Scope], Response],
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = frozenset(open_paths)
        self.metrics = metrics
        self.respond = respond

    def _check(self, header: bytes | None) -> tuple[str | None, int]:
        """Why ``header`` does not authorise the request (None when it does), and which key
        it names (its position; -1 for none)."""
        if header is None:
            return "missing", -1
        scheme, _, key = header.partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key:
            return "malformed", -1
        found = -1
        for index, known in enumerate(self.keys):
            if hmac.compare_digest(known, key):
                found = index
        return (None, found) if found >= 0 else ("wrong_key", -1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        reason, index = self._check(dict(scope["headers"]).get(b"authorization"))
        if reason is None:
            record = record_of(scope)
            if record is not None:
                record.tenant = f"key{index}"
            await self.app(scope, receive, send)
            return
        self.metrics.auth_failures.labels(reason).inc()
        error = ServiceError(ErrorType.UNAUTHORIZED, MESSAGES[reason])
        await self.respond(error, scope)(scope, receive, send)
