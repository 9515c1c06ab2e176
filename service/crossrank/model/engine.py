"""The onnxruntime engine: one session, one batch at a time, logits out.

:func:`plan_session` decides providers and options from the settings and what onnxruntime
offers (a pure function, tested without a GPU); :class:`OnnxEngine` carries it out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from crossrank.model.collate import PaddedBatch
from crossrank.ops.priority import build_on_lowered_thread, lower_current_thread

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def quiet_runtime(json_logs: bool) -> None:
    """onnxruntime's own output, which bypasses Python's logging: no telemetry (it may try to
    persist a device id under a home the process cannot write, and says so in plain text),
    and with JSON logs only its errors, which it also raises as exceptions that the service's
    JSON log lines carry."""
    ort.disable_telemetry_events()
    if json_logs:
        ort.set_default_logger_severity(3)  # 3 = error


class EngineConfigError(RuntimeError):
    """The engine cannot start as configured (said once, at start-up)."""


class Engine(Protocol):
    """What the worker needs of an engine."""

    provider: str
    uses_token_type_ids: bool

    def run(self, batch: PaddedBatch) -> np.ndarray:
        """Logits, float32, shape [pairs]. Blocking; called from one worker thread."""
        ...


@dataclass(frozen=True)
class SessionPlan:
    device: str  # "cpu" or "cuda"
    providers: list[tuple[str, dict[str, str]]]
    intra_op_threads: int
    io_binding: bool
    options: dict[str, Any] = field(default_factory=dict)
    nice: int = 0  # added to the engine threads' niceness (crossrank.ops.priority)


def plan_session(
    device: str,
    available: list[str],
    *,
    threads: int = 0,
    cuda_device_id: int = 0,
    cuda_mem_limit_mb: int = 0,
    nice: int = 0,
) -> SessionPlan:
    """Providers and options for ``device`` (auto | cpu | cuda) given the available providers."""
    if device == "cuda" and CUDA not in available:
        raise EngineConfigError(
            "device=cuda was asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install the `gpu` extra (onnxruntime-gpu) "
            "on a machine with CUDA, or use device=cpu"
        )
    use_cuda = device == "cuda" or (device == "auto" and CUDA in available)
    # Sequence lengths change with every batch: memory patterns (planned for one fixed shape)
    # only cost time, and arenas must grow by what is asked, not by doubling, or they keep the
    # high-water mark of every shape seen.
    options: dict[str, Any] = {
        "graph_optimization_level": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "enable_mem_pattern": False,
        "execution_mode": ort.ExecutionMode.ORT_SEQUENTIAL,
        "inter_op_num_threads": 1,
    }
    if use_cuda:
        cuda_options = {
            "device_id": str(cuda_device_id),
            "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": "1",
        }
        if cuda_mem_limit_mb:
            cuda_options["gpu_mem_limit"] = str(cuda_mem_limit_mb * 1024 * 1024)
        # The CPU provider stays as the fallback for the few ops CUDA lacks (shape arithmetic).
        return SessionPlan(
            device="cuda",
            providers=[(CUDA, cuda_options), (CPU, {})],
            intra_op_threads=1,
            io_binding=True,
            options=options,
            nice=nice,
        )
    # No arena on CPU: with variable shapes it keeps the largest batch's buffers forever, and
    # malloc of the few large activations per batch costs nothing next to the matmuls.
    options["enable_cpu_mem_arena"] = False
    return SessionPlan(
        device="cpu",
        providers=[(CPU, {})],
        intra_op_threads=threads or (os.cpu_count() or 1),
        io_binding=False,
        options=options,
        nice=nice,
    )


class OnnxEngine:
    def __init__(self, model_file: Path | bytes, plan: SessionPlan) -> None:
        # bytes: a graph built at start-up (crossrank.model.fp32_rebuild), which has no file name.
        source = str(model_file) if isinstance(model_file, Path) else model_file
        label = model_file.name if isinstance(model_file, Path) else "the graph built in memory"
        options = ort.SessionOptions()
        for name, value in plan.options.items():
            setattr(options, name, value)
        options.intra_op_num_threads = plan.intra_op_threads
        # Threads spin between ops by default; with one batch at a time that only burns the
        # cores the tokenizer and event loop need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        names = [name for name, _ in plan.providers]
        provider_options = [opts for _, opts in plan.providers]
        # onnxruntime creates its intra-op threads with the session: built on a lowered thread,
        # they inherit its priority.
        self._session = build_on_lowered_thread(
            plan.nice,
            lambda: ort.InferenceSession(
                source,
                sess_options=options,
                providers=names,
                provider_options=provider_options,
            ),
        )
        active = self._session.get_providers()
        if plan.device == "cuda" and CUDA not in active:
            raise EngineConfigError(
                f"CUDA was asked for but the session runs on {active}: is a GPU visible "
                "(CUDA_VISIBLE_DEVICES, driver, CUDA/cuDNN libraries)?"
            )
        self.provider = active[0]
        self._plan = plan
        inputs = {i.name for i in self._session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - inputs
        if missing:
            raise EngineConfigError(f"{label} lacks the inputs {sorted(missing)}")
        extra = inputs - {"input_ids", "attention_mask", "token_type_ids"}
        if extra:
            raise EngineConfigError(f"{label} has inputs crossrank does not know: {extra}")
        self.uses_token_type_ids = "token_type_ids" in inputs
        self._output = self._session.get_outputs()[0].name
        log.info("engine: %s on %s, %d threads", label, active, plan.intra_op_threads)

    def _feeds(self, batch: PaddedBatch) -> dict[str, np.ndarray]:
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if self.uses_token_type_ids:
            feeds["token_type_ids"] = batch.token_type_ids
        return feeds

    def run(self, batch: PaddedBatch) -> np.ndarray:
        # The calling thread works in the session's pool during a run: it yields the CPU too.
        lower_current_thread(self._plan.nice)
        feeds = self._feeds(batch)
        if self._plan.io_binding:
            binding = self._session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output(self._output, "cuda", int(self._plan.providers[0][1]["device_id"]))
            self._session.run_with_iobinding(binding)
            logits = binding.copy_outputs_to_cpu()[0]
        else:
            logits = self._session.run([self._output], feeds)[0]
        return np.asarray(logits, dtype=np.float32).reshape(-1)
