"""API keys: 401 unless ``Authorization: Bearer KEY`` names a configured key."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from crossrank.core.errors import ErrorType, ServiceError
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
        reason = self._failure(dict(scope["headers"]).get(b"authorization"))
        if reason is None:
            await self.app(scope, receive, send)
            return
        self.metrics.auth_failures.labels(reason).inc()
        error = ServiceError(ErrorType.UNAUTHORIZED, MESSAGES[reason])
        await self.respond(error, scope)(scope, receive, send)
