"""What ``variant: auto`` serves on a CPU: int8 only where it pays, else the best float variant.

int8 costs ranking agreement and pays only where the CPU multiplies int8 natively (VNNI,
AVX-VNNI, AMX); bench/README.md ("the variant `auto` serves") has both, measured by ``python -m
bench.variant_speed``. So with ``auto`` on a CPU and both kinds in the directory, start-up
times the two on a warm-up batch (interleaved, median of a few runs) and serves int8 only when
it is at least ``INT8_MIN_SPEEDUP`` times as fast as the float variant. When the probe cannot
time both, the CPU's flags decide. Any other setting is served as named.

The float candidate is fp32 when the directory has it; else, where it ships fp16 for GPUs, fp32
rebuilt from that file at start-up (:mod:`crossrank.model.fp32_rebuild`): onnxruntime runs
fp16 on a CPU through Casts, slower than fp32; else fp16 as it is.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from crossrank.model.collate import PaddedBatch
from crossrank.model.engine import Engine, SessionPlan
from crossrank.model.fp32_rebuild import FP32_FROM_FP16, rebuild_fp32
from crossrank.model.model_dir import ModelDir

log = logging.getLogger(__name__)

# /proc/cpuinfo flags of int8 dot-product instructions, which onnxruntime's int8 kernels use.
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# int8 must be this much faster than the float variant to be worth its loss of agreement.
INT8_MIN_SPEEDUP = 1.3
PROBE_ROUNDS = 3
# The probe's batch length: the warm-up batch nearest to a typical pair (TREC DL's average 76).
PROBE_LENGTH = 128

ModelSource = Path | bytes
EngineFactory = Callable[[ModelSource, SessionPlan], Engine]


@dataclass(frozen=True)
class Choice:
    variant: str
    basis: str  # "setting", "only candidate", "probe" or "cpu flags": exposed in model_info
    detail: str  # the figures behind it, for the log


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo's text (x86 ``flags``, Arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        return cpu_flags(path.read_text())
    except OSError:  # not Linux: no flags, so only the probe can pick int8
        return frozenset()


def float_candidate(variants: Collection[str]) -> str | None:
    """The float variant a CPU serves best from what the directory has."""
    if "fp32" in variants:
        return "fp32"
    if "fp16" in variants:
        return FP32_FROM_FP16
    return None


def decide(
    variants: Collection[str],
    flags: Collection[str],
    speeds: Mapping[str, float] | None = None,
) -> Choice:
    """``auto`` on a CPU, from the directory's variants, the CPU's flags and, when the probe
    timed both candidates, their pairs/s."""
    native = sorted(INT8_FLAGS & set(flags))
    cpu = f"int8 instructions: {', '.join(native) or 'none'}"
    floating = float_candidate(variants)
    if "int8" not in variants or floating is None:
        only = floating or ("int8" if "int8" in variants else sorted(variants)[0])
        return Choice(only, "only candidate", f"{only} is the only CPU variant; {cpu}")
    if speeds and "int8" in speeds and floating in speeds:
        ratio = speeds["int8"] / speeds[floating]
        variant = "int8" if ratio >= INT8_MIN_SPEEDUP else floating
        figures = f"int8 {speeds['int8']:.1f} vs {floating} {speeds[floating]:.1f} pairs/s"
        detail = f"{figures} = {ratio:.2f}x (int8 needs {INT8_MIN_SPEEDUP}x); {cpu}"
        return Choice(variant, "probe", detail)
    return Choice("int8" if native else floating, "cpu flags", cpu)


def model_source(model: ModelDir, variant: str) -> ModelSource:
    """The variant's file, or the fp32 graph rebuilt from the fp16 file."""
    if variant == FP32_FROM_FP16:
        return rebuild_fp32(model.variant_path("fp16"))
    return model.variant_path(variant)


def probe_batch(batches: Sequence[PaddedBatch]) -> PaddedBatch:
    fits = [b for b in batches if b.input_ids.shape[1] <= PROBE_LENGTH]
    return (fits or list(batches))[-1]


def time_engines(
    engines: Mapping[str, Engine], batch: PaddedBatch, rounds: int = PROBE_ROUNDS
) -> dict[str, float]:
    """Pairs/s of each engine on ``batch``: one untimed run each, then ``rounds`` rounds taking
    the engines in turn (so a change in the machine's load hits all alike), median per engine."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine.run(batch)
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.run(batch)
            times[name].append(time.perf_counter() - start)
    pairs = batch.input_ids.shape[0]
    return {name: pairs / statistics.median(spent) for name, spent in times.items()}


def load_variant(
    model: ModelDir,
    requested: str,
    plan: SessionPlan,
    factory: EngineFactory,
    batches: Sequence[PaddedBatch],
    flags: Collection[str],
) -> tuple[Choice, Engine]:
    """Resolve ``requested`` for the plan's device, load its engine (timing the CPU candidates
    when ``auto`` leaves a choice) and say why."""
    variants = model.metadata.variants
    floating = float_candidate(variants)
    if requested != "auto":
        choice = Choice(requested, "setting", "named by the variant setting")
    elif plan.device != "cpu":
        choice = Choice(model.choose_variant(requested, plan.device), "device", plan.device)
    elif "int8" not in variants or floating is None:
        choice = decide(variants, flags)
    else:
        engines = {v: factory(model_source(model, v), plan) for v in ("int8", floating)}
        try:
            speeds = time_engines(engines, probe_batch(batches))
        except Exception:  # e.g. a kernel the CPU lacks: the flags choose, and warm-up tells
            log.exception("variant probe failed; choosing by the CPU's flags")
            speeds = None
        choice = decide(variants, flags, speeds)
        return choice, engines[choice.variant]
    return choice, factory(model_source(model, choice.variant), plan)
