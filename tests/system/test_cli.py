"""`crossrank serve` as a user runs it: a real process, a real signal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from support import free_port, metric_value

from crossrank.cli import main
from crossrank.model.model_dir import ModelDir


def test_serve_without_a_model_says_what_it_needs(capsys, monkeypatch) -> None:
    monkeypatch.delenv("CROSSRANK_MODEL", raising=False)
    assert main(["serve"]) == 2
    assert "no model to serve" in capsys.readouterr().err


def test_serve_with_a_bad_model_dir_fails_before_starting(capsys, tmp_path) -> None:
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "crossrank.json is missing" in capsys.readouterr().err


def test_serve_cuda_without_cuda_fails_clearly(capsys, model_dir: ModelDir) -> None:
    assert main(["serve", "--model", str(model_dir.path), "--device", "cuda"]) == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err


def test_invalid_settings_are_reported(capsys, model_dir: ModelDir) -> None:
    code = main(
        ["serve", "--model", str(model_dir.path), "--max-passages", "10", "--max-queued-pairs", "5"]
    )
    assert code == 2
    assert "max_queued_pairs" in capsys.readouterr().err


def test_serve_with_a_broken_onnx_file_refuses_to_start_naming_it(
    model_dir: ModelDir, tmp_path: Path
) -> None:
    # The directory passes the catalog's checks (crossrank.json, tokenizer.json); the graph
    # only fails when the engine loads it, which must still stop the server, not serve nothing.
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir.path, broken)
    graphs = sorted(broken.glob("*.onnx"))
    assert graphs
    for graph in graphs:
        graph.write_bytes(b"not an onnx graph")
    command = [sys.executable, "-m", "crossrank.cli", "serve", "--model", str(broken)]
    env = {**os.environ, "CROSSRANK_PORT": str(free_port()), "CROSSRANK_THREADS": "1"}
    result = subprocess.run(
        [*command, "--host", "127.0.0.1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert any(graph.name in output for graph in graphs), output[-2000:]


def serve_once(model_dir: ModelDir, *flags: str, **env: str) -> str:
    """Run ``crossrank serve`` until ready, score a request, refuse one, stop it with SIGTERM
    and check it exits cleanly; everything it wrote, stdout and stderr."""
    port = free_port()
    env = {**os.environ, "CROSSRANK_PORT": str(port), "CROSSRANK_THREADS": "1", **env}
    command = [sys.executable, "-m", "crossrank.cli", "serve", "--model", str(model_dir.path)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        r = httpx.post(url + "/rerank", json={"query": "sky", "passages": ["blue sky", "a cat"]})
        assert r.status_code == 200
        assert [x["index"] for x in r.json()["results"]] in ([0, 1], [1, 0])
        too_many = httpx.post(url + "/rerank", json={"query": "sky", "passages": ["a"] * 1001})
        assert too_many.status_code == 422
        assert metric_value(httpx.get(url + "/metrics").text, "crossrank_pairs_total") == 2.0
        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once shut down, so the exit status says SIGTERM.
        assert process.wait(30) in (0, -signal.SIGTERM)
        return process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_end_to_end_and_sigterm_exits_cleanly(model_dir: ModelDir) -> None:
    log = serve_once(model_dir)
    assert "draining" in log
    assert "Application shutdown complete" in log


def test_with_json_logs_every_line_the_process_writes_is_json(
    model_dir: ModelDir, tmp_path: Path
) -> None:
    # A home it cannot write (as in the image) once made onnxruntime print a plain-text line.
    log = serve_once(model_dir, "--log-format", "json", HOME=str(tmp_path / "no-such-home"))
    lines = log.splitlines()
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    messages = [r["message"] for r in records]
    assert any("draining" in m for m in messages)
    assert any(r["logger"] == "crossrank.access" for r in records)
    assert "Application shutdown complete." in messages


def test_the_serving_path_never_imports_torch() -> None:
    code = (
        "import sys, crossrank.cli, crossrank.http.server, crossrank.http.app; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
