"""Bounds on reading a request's head, which uvicorn's httptools protocol lacks.

uvicorn closes a kept-alive connection idle for ``timeout_keep_alive`` (5 s) between requests,
but nothing bounds the time a client takes to send a request's head: a connection that sends
nothing, or one header byte every few seconds (a slowloris), is held forever, a file descriptor
each. Nor does anything bound its size (a header of megabytes was accepted). This protocol closes a
connection whose request line and headers are not all in within ``header_timeout_s`` of the
connection (or of the request's first byte, on a kept-alive connection), and answers 400 to a
head over ``max_header_bytes``. The body has its own bounds, in
:class:`crossrank.http.body_limit.BodyLimitMiddleware`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    def __init__(
        self, *args: object, header_timeout_s: float, max_header_bytes: int, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        log.info(
            "closed a connection from %s: no complete request head within %.1f s",
            self.client[0] if self.client else "?",
            self.header_timeout_s,
        )
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()  # a kept-alive connection's next request

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            # Raised inside the parser's callback, it reaches uvicorn as a parse error: a 400
            # and the connection closed.
            raise ValueError(f"request head over {self.max_header_bytes} bytes")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_timeout_protocol(
    header_timeout_s: float, max_header_bytes: int
) -> Callable[..., HeaderTimeoutProtocol]:
    """What uvicorn's ``http`` setting takes: a factory of the protocol, per connection."""
    return functools.partial(
        HeaderTimeoutProtocol,
        header_timeout_s=header_timeout_s,
        max_header_bytes=max_header_bytes,
    )
