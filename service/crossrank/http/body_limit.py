"""Bounds on a request's body: its size (413) and the time it takes to arrive (408)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crossrank.core.errors import ErrorType, ServiceError


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once from Content-Length, else while it streams;
    408 for a body not all in within ``timeout_s`` of the request's start (a client trickling
    it would otherwise hold its connection and its request for ever). The slow head of a
    request has its bound in crossrank.http.slow_clients."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        respond: Callable[[ServiceError, Scope], Response],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.respond = respond

    def _too_large(self) -> str:
        return f"the request body exceeds this server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = ServiceError(ErrorType.BODY_TOO_LARGE, self._too_large())
            await self.respond(error, scope)(scope, receive, send)
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
                raise HTTPException(
                    408, f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the app's body read, an HTTPException reaches the app's
                    # handler, which answers it as the body_too_large error.
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited_receive, send)
