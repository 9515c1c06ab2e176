from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import RunningServer, build_model_dir, run_server

from crossrank.model.model_dir import ModelDir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    return build_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def server(model_dir: ModelDir) -> Iterator[RunningServer]:
    with run_server(model_dir, max_passages=1000, max_wait_ms=5) as running:
        running.wait_ready()
        yield running
