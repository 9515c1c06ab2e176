"""Running the app under uvicorn with a graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import FrameType

import uvicorn

from crossrank.app import create_app
from crossrank.logs import configure
from crossrank.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On a stop signal, the service refuses new requests at once (503 shutting_down); uvicorn
    then stops accepting connections, waits for the admitted requests to be answered, and runs
    the app's shutdown, which lets the batcher finish its queue."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("signal %s: draining", sig)
            self._on_stop()
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    configure(settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        # Our handler formats uvicorn's records too; our access line replaces uvicorn's.
        log_config=None,
        access_log=not settings.access_log,
        # Admitted requests are always answered: no time limit on the graceful shutdown.
        timeout_graceful_shutdown=None,
    )
    # One process, one event loop: the batcher must see every request to batch them together.
    DrainingServer(config, on_stop=app.state.service.begin_drain).run()
