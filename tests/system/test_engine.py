"""Engine configuration (CUDA checked by design: no GPU is needed to test the plan)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from support import free_port

from crossrank.model.collate import pad_pairs
from crossrank.model.engine import CPU, CUDA, EngineConfigError, OnnxEngine, plan_session
from crossrank.model.model_dir import ModelDir
from crossrank.model.tokenization import PairTokenizer
from crossrank.ops import priority


def test_cuda_requested_without_cuda_fails_clearly() -> None:
    with pytest.raises(EngineConfigError, match="CUDAExecutionProvider"):
        plan_session("cuda", [CPU])


def test_auto_picks_cpu_without_cuda() -> None:
    plan = plan_session("auto", [CPU], threads=3)
    assert plan.device == "cpu"
    assert plan.providers == [(CPU, {})]
    assert plan.intra_op_threads == 3
    assert not plan.io_binding
    assert plan.options["enable_cpu_mem_arena"] is False
    assert plan.options["enable_mem_pattern"] is False


def test_auto_picks_cuda_when_available_with_bounded_arena_and_io_binding() -> None:
    plan = plan_session("auto", [CUDA, CPU], cuda_device_id=1, cuda_mem_limit_mb=2048)
    assert plan.device == "cuda"
    (name, options), fallback = plan.providers
    assert name == CUDA and fallback == (CPU, {})
    assert options["device_id"] == "1"
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert options["gpu_mem_limit"] == str(2048 * 1024 * 1024)
    assert plan.io_binding


def test_cpu_forced_even_when_cuda_exists() -> None:
    assert plan_session("cpu", [CUDA, CPU]).device == "cpu"


def test_engine_reads_input_names_and_works_without_token_types(
    model_dir: ModelDir, tmp_path: Path
) -> None:
    tokenizer = PairTokenizer(model_dir.tokenizer_path, 16, 128)
    batch = pad_pairs(tokenizer.encode("sky", ["blue sky", "a cat sat"]).pairs)
    plan = plan_session("cpu", [CPU], threads=1)
    with_types = OnnxEngine(model_dir.variant_path("fp32"), plan)
    assert with_types.uses_token_type_ids
    logits = with_types.run(batch)
    assert logits.shape == (2,) and logits.dtype == np.float32

    # A graph without token_type_ids (e.g. DistilBERT-style): the engine must not feed one.
    graph = onnx.load(model_dir.variant_path("fp32"))
    constant = onnx.helper.make_node(
        "Constant",
        [],
        ["token_type_ids"],
        value=onnx.helper.make_tensor("zero", onnx.TensorProto.INT64, [1, 1], [0]),
    )
    del graph.graph.input[2]
    graph.graph.node.insert(0, constant)
    pruned = tmp_path / "no_types.onnx"
    onnx.save(graph, pruned)
    without = OnnxEngine(pruned, plan)
    assert not without.uses_token_type_ids
    assert without.run(batch).shape == (2,)


def test_unknown_inputs_are_refused(model_dir: ModelDir, tmp_path: Path) -> None:
    graph = onnx.load(model_dir.variant_path("fp32"))
    graph.graph.input.append(
        onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, [1])
    )
    odd = tmp_path / "odd.onnx"
    onnx.save(graph, odd)
    with pytest.raises(EngineConfigError, match="pixel_values"):
        OnnxEngine(odd, plan_session("cpu", [CPU]))


def _threads(pid: int | str = "self") -> dict[int, tuple[int, int]]:
    """Each thread of a process: its nice value and the CPU ticks it has used (fields 19, and
    14 + 15, of /proc/PID/task/TID/stat)."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            threads[int(tid)] = (int(fields[16]), int(fields[11]) + int(fields[12]))
    return threads


def _niceness() -> dict[int, int]:
    """Each thread of this process: its nice value."""
    return {tid: nice for tid, (nice, _) in _threads().items()}


@pytest.mark.skipif(not priority.supported(), reason="per-thread niceness is Linux's")
def test_engine_threads_yield_the_cpu_and_nothing_else_does(model_dir: ModelDir) -> None:
    before = _niceness()
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    plan = plan_session("cpu", [CPU], threads=3, nice=7)
    engine = OnnxEngine(model_dir.variant_path("fp32"), plan)
    created = {tid: nice for tid, nice in _niceness().items() if tid not in before}
    # onnxruntime's intra-op pool (threads - 1 workers) was made with the session.
    assert len(created) >= 2
    assert set(created.values()) == {base + 7}
    assert _niceness()[threading.get_native_id()] == base  # the caller is untouched

    tokenizer = PairTokenizer(model_dir.tokenizer_path, 16, 128)
    batch = pad_pairs(tokenizer.encode("sky", ["blue sky"]).pairs)
    with ThreadPoolExecutor(max_workers=1) as runner:
        runner.submit(engine.run, batch).result()
        # The thread that runs batches joins the pool's work, so it is lowered too.
        runner_nice = runner.submit(lambda: _niceness()[threading.get_native_id()]).result()
    assert runner_nice == base + 7
    assert _niceness()[threading.get_native_id()] == base

    unlowered = OnnxEngine(model_dir.variant_path("fp32"), plan_session("cpu", [CPU], threads=3))
    assert unlowered.run(batch).shape == (1,)
    assert _niceness()[threading.get_native_id()] == base


@pytest.mark.slow
@pytest.mark.skipif(not priority.supported(), reason="per-thread niceness is Linux's")
def test_in_a_serving_process_every_busy_thread_but_the_event_loop_is_lowered(
    model_dir: ModelDir,
) -> None:
    """A real ``crossrank serve`` (the tokeniser's Rust thread pool is one per process, made on
    its first use): the threads that score a request, tokenisation's included, run lowered; the
    event loop (the process's main thread) does not."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "crossrank.cli", "serve", "--model", str(model_dir.path)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--threads", "2"]
    command += ["--engine-nice", "5", "--max-passages", "1000"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the server exited during start-up"
            assert time.monotonic() < deadline, "the server never became ready"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/ready").status_code == 200:
                    break
            time.sleep(0.1)
        before = _threads(process.pid)
        passages = [
            f"the blue sky over the river and the city of paris {i} " * 40 for i in range(1000)
        ]
        body = {"query": "where is the sky blue", "passages": passages}
        assert httpx.post(url + "/rerank", json=body, timeout=300).status_code == 200
        after = _threads(process.pid)
    finally:
        process.kill()
        process.wait()
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    busy = {tid for tid, (_, ticks) in after.items() if ticks > before.get(tid, (0, 0))[1]}
    # The loop parsed and answered; tokenisation's pool and onnxruntime's did the work.
    assert process.pid in busy
    assert after[process.pid][0] == base
    lowered = busy - {process.pid}
    assert len(lowered) >= 3, after
    assert {after[tid][0] for tid in lowered} == {base + 5}, after
