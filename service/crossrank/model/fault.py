"""Fault injection for tests: an engine that hangs on demand.

A test of a fleet needs one real replica's engine to hang (a deadlocked driver, a stuck GPU) and
then recover, to watch the watchdog, ``/ready`` and the load balancer react. With the
``test_stall_file`` setting, every batch waits while that file exists. Never set it in
production.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from crossrank.model.collate import PaddedBatch
from crossrank.model.engine import Engine, SessionPlan
from crossrank.model.variant_choice import EngineFactory, ModelSource


class StallWhileFileExists:
    def __init__(self, inner: Engine, path: Path) -> None:
        self._inner = inner
        self._path = path
        self.provider = inner.provider
        self.uses_token_type_ids = inner.uses_token_type_ids

    def run(self, batch: PaddedBatch) -> np.ndarray:
        while self._path.exists():
            time.sleep(0.02)
        return self._inner.run(batch)


def stalling(factory: EngineFactory, path: Path) -> EngineFactory:
    """``factory``'s engines, each hanging while ``path`` exists."""

    def build(source: ModelSource, plan: SessionPlan) -> Engine:
        return StallWhileFileExists(factory(source, plan), path)

    return build
