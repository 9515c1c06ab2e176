"""A time bound on reading a request's head, which uvicorn lacks.

uvicorn closes a kept-alive connection idle for ``timeout_keep_alive`` (5 s) between requests,
and its parser bounds the head's size (httptools: 80 KB), but nothing bounds the time a client
takes to send it: a connection that sends nothing, or one header byte every few seconds (a
slowloris), is held forever, a file descriptor each. This protocol closes a connection whose
request line and headers are not all in within ``header_timeout_s`` of the connection (or of the
request's first byte, on a kept-alive connection). The body has its own bound, in
:class:`crossrank.middleware.BodyLimitMiddleware`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    def __init__(self, *args: object, header_timeout_s: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

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
        self._arm()  # a kept-alive connection's next request

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_timeout_protocol(header_timeout_s: float) -> Callable[..., HeaderTimeoutProtocol]:
    """What uvicorn's ``http`` setting takes: a factory of the protocol, per connection."""
    return functools.partial(HeaderTimeoutProtocol, header_timeout_s=header_timeout_s)
