"""The container health probe (`python -m crossrank.ops.probe`) against a real server."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from support import RunningServer, free_port

from crossrank.ops.probe import main, probe


def test_probe_passes_on_ready_and_fails_with_the_reason(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = urlsplit(server.url).port
    assert port is not None
    assert probe("/ready", port) is None
    assert probe("/health", port) is None
    missing = probe("/no-such-route", port)
    assert missing is not None and "HTTP 404" in missing and "not_found" in missing
    refused = probe("/ready", free_port())
    assert refused is not None and "refused" in refused.lower()

    monkeypatch.setenv("CROSSRANK_PORT", str(port))
    assert main([]) == 0
    assert main(["/no-such-route"]) == 1
    assert "crossrank probe:" in capsys.readouterr().err


def test_probe_runs_as_a_module_the_way_the_image_calls_it(server: RunningServer) -> None:
    env = {"CROSSRANK_PORT": str(urlsplit(server.url).port), "PATH": ""}
    ready = subprocess.run(
        [sys.executable, "-m", "crossrank.ops.probe", "/ready"], env=env, capture_output=True
    )
    assert ready.returncode == 0, ready.stderr
    env["CROSSRANK_PORT"] = str(free_port())
    down = subprocess.run(
        [sys.executable, "-m", "crossrank.ops.probe"], env=env, capture_output=True
    )
    assert down.returncode == 1
