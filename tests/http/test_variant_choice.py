"""variant auto on a CPU: the decision (pure), the fp32 rebuilt from fp16, and the real probe."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from support import run_server

from crossrank.core.served import warmup_batches
from crossrank.model.collate import PaddedBatch
from crossrank.model.engine import OnnxEngine, plan_session
from crossrank.model.fp32_rebuild import FP32_FROM_FP16, rebuild_fp32
from crossrank.model.model_dir import ModelDir, ModelDirError, load_model_dir
from crossrank.model.tokenization import load_pair_encoder
from crossrank.model.variant_choice import (
    INT8_MIN_SPEEDUP,
    cpu_flags,
    decide,
    float_candidate,
    load_variant,
    probe_batch,
    time_engines,
)
from crossrank_train.export import convert_fp16, quantize_int8

AVX2 = frozenset({"sse4_2", "avx2", "fma"})
VNNI = AVX2 | {"avx512f", "avx512_vnni"}
SHIPPED = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}  # the bundled model's variants


def test_cpu_flags_from_cpuinfo() -> None:
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx2 avx512_vnni\n"
    assert cpu_flags(x86) == {"fpu", "sse4_2", "avx2", "avx512_vnni"}
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n"
    assert cpu_flags(arm) == {"fp", "asimd", "asimddp", "i8mm"}
    assert cpu_flags("") == frozenset()


def test_the_float_candidate_is_fp32_else_fp32_rebuilt_from_fp16() -> None:
    assert float_candidate({"fp32", "int8", "fp16"}) == "fp32"
    assert float_candidate(SHIPPED) == FP32_FROM_FP16
    assert float_candidate({"int8"}) is None


def test_flags_choose_when_there_is_no_probe() -> None:
    assert decide(SHIPPED, VNNI).variant == "int8"
    assert decide(SHIPPED, AVX2 | {"avx_vnni"}).variant == "int8"
    assert decide(SHIPPED, AVX2 | {"amx_int8"}).variant == "int8"
    choice = decide(SHIPPED, AVX2)
    assert (choice.variant, choice.basis) == (FP32_FROM_FP16, "cpu flags")
    assert "int8 instructions: none" in choice.detail
    assert decide({"fp32", "int8"}, AVX2).variant == "fp32"


def test_the_probe_overrules_the_flags() -> None:
    # A VNNI CPU on which int8 is not faster enough (a small model, a busy core) serves float...
    slow = decide(SHIPPED, VNNI, {"int8": 120.0, FP32_FROM_FP16: 100.0})
    assert (slow.variant, slow.basis) == (FP32_FROM_FP16, "probe")
    assert "1.20x" in slow.detail and "avx512_vnni" in slow.detail
    # ... and int8 that is, on any CPU, is served.
    fast = decide({"fp32", "int8"}, AVX2, {"int8": 100.0 * INT8_MIN_SPEEDUP, "fp32": 100.0})
    assert (fast.variant, fast.basis) == ("int8", "probe")
    # A probe that timed only one candidate leaves the choice to the flags.
    assert decide(SHIPPED, VNNI, {"int8": 50.0}).basis == "cpu flags"


def test_a_single_cpu_variant_is_served_whatever_the_cpu() -> None:
    for variants, expected in (({"fp32"}, "fp32"), ({"int8"}, "int8"), ({"fp16"}, FP32_FROM_FP16)):
        for flags in (AVX2, VNNI):
            choice = decide(variants, flags, {"int8": 1.0})
            assert (choice.variant, choice.basis) == (expected, "only candidate")


class Sleeper:
    """An engine that takes a fixed time a batch."""

    provider = "test"
    uses_token_type_ids = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.runs = 0

    def run(self, batch: PaddedBatch) -> np.ndarray:
        self.runs += 1
        time.sleep(self.seconds)
        return np.zeros(batch.input_ids.shape[0], np.float32)


def test_time_engines_interleaves_and_reports_pairs_per_second(model_dir: ModelDir) -> None:
    batch = probe_batch(batches_for(model_dir))
    fast, slow = Sleeper(0.002), Sleeper(0.02)
    speeds = time_engines({"int8": fast, "fp32": slow}, batch, rounds=3)
    assert fast.runs == slow.runs == 4  # one untimed, three timed
    pairs = batch.input_ids.shape[0]
    assert speeds["fp32"] < pairs / 0.02 < speeds["int8"] <= pairs / 0.002
    assert decide({"fp32", "int8"}, AVX2, speeds).variant == "int8"


def batches_for(model: ModelDir) -> list[PaddedBatch]:
    tokenizer = load_pair_encoder(model)
    probe = tokenizer.encode("warm up", ["the engine answers"]).pairs[0]
    return warmup_batches(probe, model.metadata.max_length, 1024, 256)


@pytest.fixture(scope="module")
def shipped_like(model_dir: ModelDir, tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    """The tiny model as the bundled model ships: int8 and fp16, no fp32 file."""
    out = tmp_path_factory.mktemp("shipped-like")
    fp32 = model_dir.variant_path("fp32")
    quantize_int8(fp32, out / SHIPPED["int8"])
    convert_fp16(fp32, out / SHIPPED["fp16"])
    shutil.copy(model_dir.tokenizer_path, out)
    meta = model_dir.metadata.model_copy(update={"variants": SHIPPED})
    (out / "crossrank.json").write_text(meta.model_dump_json())
    return load_model_dir(out)


def test_fp32_rebuilt_from_fp16_has_no_fp16_left_and_scores_as_fp32(
    model_dir: ModelDir, shipped_like: ModelDir
) -> None:
    rebuilt = onnx.load_from_string(rebuild_fp32(shipped_like.variant_path("fp16")))
    fp16 = onnx.TensorProto.FLOAT16
    assert all(t.data_type != fp16 for t in rebuilt.graph.initializer)
    assert all(
        v.type.tensor_type.elem_type != fp16
        for v in (*rebuilt.graph.value_info, *rebuilt.graph.input, *rebuilt.graph.output)
    )
    assert not any(
        a.i == fp16 for n in rebuilt.graph.node if n.op_type == "Cast" for a in n.attribute
    )
    plan = plan_session("cpu", ["CPUExecutionProvider"], threads=1)
    batch = batches_for(model_dir)[2]
    original = OnnxEngine(model_dir.variant_path("fp32"), plan).run(batch)
    widened = OnnxEngine(rebuild_fp32(shipped_like.variant_path("fp16")), plan).run(batch)
    # Only the weights' rounding to fp16 separates the two (the head was never fp16).
    np.testing.assert_allclose(widened, original, rtol=1e-2, atol=1e-2 * np.abs(original).max())


def test_auto_probes_the_shipped_variants_on_a_real_engine(shipped_like: ModelDir) -> None:
    plan = plan_session("cpu", ["CPUExecutionProvider"], threads=1)
    choice, engine = load_variant(
        shipped_like, "auto", plan, OnnxEngine, batches_for(shipped_like), AVX2
    )
    assert choice.basis == "probe"
    assert choice.variant in ("int8", FP32_FROM_FP16)
    figures = re.search(
        r"int8 ([\d.]+) vs fp32-from-fp16 ([\d.]+) pairs/s = ([\d.]+)x", choice.detail
    )
    assert figures, choice.detail
    int8, floating, ratio = (float(g) for g in figures.groups())
    assert int8 > 0 and floating > 0
    assert (choice.variant == "int8") == (ratio >= INT8_MIN_SPEEDUP)
    assert engine.run(batches_for(shipped_like)[0]).shape == (
        batches_for(shipped_like)[0].input_ids.shape[0],
    )


def test_the_setting_overrides_auto(shipped_like: ModelDir) -> None:
    plan = plan_session("cpu", ["CPUExecutionProvider"], threads=1)
    batches = batches_for(shipped_like)
    for named in ("int8", "fp16", FP32_FROM_FP16):
        choice, _ = load_variant(shipped_like, named, plan, OnnxEngine, batches, VNNI)
        assert (choice.variant, choice.basis) == (named, "setting")
    with pytest.raises(ModelDirError, match="no variant 'fp32'"):
        load_variant(shipped_like, "fp32", plan, OnnxEngine, batches, VNNI)


def test_the_service_exposes_its_choice(shipped_like: ModelDir) -> None:
    with run_server(shipped_like) as srv:
        srv.wait_ready()
        with srv.client() as http:
            text = http.get("/metrics").text
    info = re.search(r"crossrank_model_info\{(.*)\} 1\.0", text)
    assert info, text
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    assert labels["variant_choice"] == "probe"
    assert labels["variant"] in ("int8", FP32_FROM_FP16)


def test_a_directory_without_fp16_cannot_rebuild(model_dir: ModelDir, tmp_path: Path) -> None:
    plan = plan_session("cpu", ["CPUExecutionProvider"], threads=1)
    with pytest.raises(ModelDirError, match="no variant 'fp16'"):
        load_variant(model_dir, FP32_FROM_FP16, plan, OnnxEngine, batches_for(model_dir), AVX2)
