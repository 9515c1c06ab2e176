"""A real crossrank server on loopback for tests, with an engine a test can gate, fail and
watch (the batches it ran)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from crossrank.app import create_app
from crossrank.collate import PaddedBatch
from crossrank.engine import OnnxEngine, SessionPlan
from crossrank.model_dir import ModelDir
from crossrank.server import DrainingServer, uvicorn_config
from crossrank.settings import Settings


class GatedEngine:
    """The real engine behind a gate the test opens, and a switch that makes it raise."""

    def __init__(self, model_file: Path, plan: SessionPlan, closed: bool = False) -> None:
        self.inner = OnnxEngine(model_file, plan)
        self.provider = self.inner.provider
        self.uses_token_type_ids = self.inner.uses_token_type_ids
        self.gate = threading.Event()
        if not closed:
            self.gate.set()
        self.entered = threading.Semaphore(0)
        self.fail_when: Callable[[PaddedBatch], bool] = lambda batch: False
        self.batches: list[int] = []
        self.padded_tokens: list[int] = []

    def run(self, batch: PaddedBatch) -> np.ndarray:
        self.entered.release()
        assert self.gate.wait(30), "test gate never opened"
        if self.fail_when(batch):
            raise RuntimeError("injected engine fault")
        self.batches.append(batch.pairs)
        self.padded_tokens.append(batch.padded_tokens)
        return self.inner.run(batch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, server: DrainingServer, thread: threading.Thread, url: str, app) -> None:
        self.server = server
        self.thread = thread
        self.url = url
        self.app = app
        self.engine: GatedEngine | None = None

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if c.get("/ready").status_code == 200:
                    return
                time.sleep(0.02)
        raise TimeoutError("server never became ready")


@contextmanager
def run_server(
    model: ModelDir, gated: bool = False, hold_warm_up: bool = False, **overrides
) -> Iterator[RunningServer]:
    """A real uvicorn server on loopback, in a thread, with the given settings. With
    ``hold_warm_up`` the gated engine starts closed: the warm-up cannot finish before the test
    opens the gate (closing it after start races a fast warm-up)."""
    port = free_port()
    settings = Settings(model=model.path, host="127.0.0.1", port=port, threads=1, **overrides)
    holder: dict[str, GatedEngine] = {}

    def factory(path: Path, plan: SessionPlan):
        if not gated:
            return OnnxEngine(path, plan)
        holder["engine"] = GatedEngine(path, plan, closed=hold_warm_up)
        return holder["engine"]

    app = create_app(settings, engine_factory=factory)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, on_stop=app.state.service.begin_drain)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        time.sleep(0.01)
    running = RunningServer(server, thread, f"http://127.0.0.1:{port}", app)
    running.engine = holder.get("engine")
    try:
        yield running
    finally:
        if running.engine is not None:
            running.engine.gate.set()
        server.should_exit = True
        thread.join(30)
