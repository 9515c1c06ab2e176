"""Running the app under uvicorn with a graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from crossrank.http.app import create_app
from crossrank.http.slow_clients import header_timeout_protocol
from crossrank.model.engine import quiet_runtime
from crossrank.ops.logs import configure
from crossrank.ops.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A stop signal starts the drain: the service refuses new requests at once (503
    shutting_down) while the listener stays open for ``drain_delay_s`` (Kubernetes keeps
    routing to a terminating pod for a few seconds, and a closed port would turn those requests
    into connection errors); then uvicorn stops accepting connections, waits for the admitted
    requests to be answered, and runs the app's shutdown, which waits for every admitted
    pair to be scored. A second signal stops at once."""

    def __init__(
        self, config: uvicorn.Config, on_stop: Callable[[], None], drain_delay_s: float = 0.0
    ) -> None:
        super().__init__(config)
        self._on_stop = on_stop
        self._drain_delay_s = drain_delay_s
        self._close_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._close_at is None and not self.should_exit:
            log.info(
                "signal %s: draining: new requests get 503 and the listener closes in %.1f s",
                sig,
                self._drain_delay_s,
            )
            self._on_stop()
            self._close_at = time.monotonic() + self._drain_delay_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s; the drain delay ends here.
        if self._close_at is not None and time.monotonic() >= self._close_at:
            self.should_exit = True
        return await super().on_tick(counter)


def uvicorn_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=header_timeout_protocol(settings.header_timeout_s, settings.max_header_bytes),
        log_level="info",
        # Our handler formats uvicorn's records too; our access line replaces uvicorn's.
        log_config=None,
        access_log=not settings.access_log,
        # What is left of the grace period once the listener closes: requests not answered by
        # then are cancelled (the app's shutdown holds the same deadline).
        timeout_graceful_shutdown=max(0.0, settings.drain_grace_s - settings.drain_delay_s),
    )


def serve(settings: Settings) -> None:
    configure(settings.log_format)
    quiet_runtime(json_logs=settings.log_format == "json")
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    # One process, one event loop: the queue must see every request to batch them together.
    server = DrainingServer(
        config, on_stop=app.state.service.begin_drain, drain_delay_s=settings.drain_delay_s
    )
    server.run()
