from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from support import build_model, build_model_dir, build_tokenizer
from toy_data import GRADED_LEVELS, MAX_LENGTH, MAX_QUERY_TOKENS, graded_cases
from transformers import BertForSequenceClassification

import crossrank_train.export as export_module
from crossrank.model.collate import pad_pairs
from crossrank.model.engine import OnnxEngine, plan_session
from crossrank.model.model_dir import METADATA_FILE, Activation, load_model_dir
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.agreement import (
    THRESHOLDS,
    AgreementError,
    check_agreement,
    ranking_agreement,
)
from crossrank_train.export import (
    PARITY_TOLERANCE,
    ParityError,
    export_checkpoint,
    export_model_dir,
    quantize_int8,
)
from crossrank_train.models import PROVENANCE_FILE, load_cross_encoder, tokenizer_file
from crossrank_train.scoring import TorchScorer


def test_export_passes_its_gates_and_serves_the_torch_ranking(
    graded_checkpoint: Path, tmp_path: Path
) -> None:
    sample = graded_cases(6, GRADED_LEVELS, seed=1)
    model_dir = export_checkpoint(
        graded_checkpoint, tmp_path / "model", name="graded", sample=sample, sample_source="toy"
    )

    meta = load_model_dir(model_dir.path).metadata
    assert meta.variants == {
        "fp32": "model.onnx",
        "int8": "model.int8.onnx",
        "fp16": "model.fp16.onnx",
    }
    # Lengths as trained; identity, since MarginMSE logits are only meaningful as differences.
    assert (meta.max_query_tokens, meta.max_length) == (MAX_QUERY_TOKENS, MAX_LENGTH)
    assert meta.activation == Activation.IDENTITY
    assert meta.training["loss"] == "margin-mse"
    report = meta.training["export"]
    assert report["git_commit"]
    assert set(report["parity_max_abs_logit_delta"]) == {"exported", "fused"}
    assert max(report["parity_max_abs_logit_delta"].values()) <= PARITY_TOLERANCE
    assert report["fused_operators"]["Attention"] == 2
    for variant in ("int8", "fp16"):
        assert report["agreement"][variant]["kendall_tau"] >= THRESHOLDS[variant].min_kendall_tau

    torch_scorer = TorchScorer(
        load_cross_encoder(graded_checkpoint),
        PairTokenizer(tokenizer_file(graded_checkpoint), MAX_QUERY_TOKENS, MAX_LENGTH),
    )
    tokenizer = PairTokenizer(model_dir.tokenizer_path, meta.max_query_tokens, meta.max_length)
    engine = OnnxEngine(
        model_dir.variant_path("fp32"), plan_session("cpu", ["CPUExecutionProvider"])
    )
    for case in sample:
        expected = torch_scorer.score(case.query, case.passages)
        served = engine.run(pad_pairs(tokenizer.encode(case.query, case.passages).pairs))
        np.testing.assert_allclose(served, expected, atol=PARITY_TOLERANCE)
        assert np.argsort(-served).tolist() == np.argsort(-expected).tolist()


class ShapeDependentBert(BertForSequenceClassification):
    """A model the tracer gets wrong: the exporter traces at 16 tokens and freezes this branch."""

    def forward(self, input_ids: torch.Tensor, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 16:
            output.logits = output.logits + 1.0
        return output


def test_parity_gate_fails_a_model_the_graph_does_not_reproduce(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    good = build_model(tokenizer.get_vocab_size(), MAX_LENGTH)
    broken = ShapeDependentBert(good.config)
    broken.load_state_dict(good.state_dict())
    # Passages long enough that every sample batch is over 16 tokens.
    sample = graded_cases(3, GRADED_LEVELS, seed=2)

    with pytest.raises(ParityError, match=r"max \|Δlogit\|"):
        export_model_dir(
            broken.eval(),
            tokenizer,
            tmp_path,
            name="broken",
            max_query_tokens=16,
            max_length=MAX_LENGTH,
            sample=sample,
        )
    assert not (tmp_path / METADATA_FILE).exists()

    passed = export_model_dir(
        good,
        tokenizer,
        tmp_path,
        name="good",
        max_query_tokens=16,
        max_length=MAX_LENGTH,
        sample=sample,
    )
    delta = passed.metadata.training["export"]["parity_max_abs_logit_delta"]["exported"]
    assert delta <= PARITY_TOLERANCE


def test_int8_keeps_the_excluded_matmuls_in_fp32(tmp_path: Path) -> None:
    fp32 = build_model_dir(tmp_path / "tiny").variant_path("fp32")
    graph = onnx.load(str(fp32)).graph
    weights = {t.name for t in graph.initializer}
    # The first layer's linear MatMuls (a weight as input): the ones int8 always quantises.
    kept = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and "layer.0/" in n.name and weights & set(n.input)
    ]
    assert kept

    def ops(exclude: list[str]) -> dict[str, str]:
        quantize_int8(fp32, tmp_path / "int8.onnx", exclude=exclude)
        return {n.name: n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}

    def integer_matmuls(graph_ops: dict[str, str]) -> int:
        return sum(op == "MatMulInteger" for op in graph_ops.values())

    everything, partial = ops([]), ops(kept)
    assert all(partial[name] == "MatMul" for name in kept)
    assert integer_matmuls(partial) == integer_matmuls(everything) - len(kept) > 0


def _negate_logits(source: Path, target: Path) -> None:
    """A 'quantiser' whose graph ranks everything backwards."""
    model = onnx.load(str(source))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}_raw" if name == output else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", [f"{output}_raw"], [output]))
    onnx.save(model, str(target))


def test_agreement_gate_fails_the_export_of_a_variant_that_reorders(
    graded_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "quantize_int8", _negate_logits)

    with pytest.raises(AgreementError, match="int8 variant ranks 4 sample queries"):
        export_checkpoint(
            graded_checkpoint,
            tmp_path,
            name="reordered",
            sample=graded_cases(4, GRADED_LEVELS, seed=3),
            sample_source="toy",
        )
    assert not (tmp_path / METADATA_FILE).exists()


def test_ranking_agreement_figures() -> None:
    scores = np.arange(12, dtype=np.float32)
    one_swap = scores.copy()
    one_swap[[0, 1]] = one_swap[[1, 0]]
    top_changed = scores.copy()
    top_changed[[1, 11]] = top_changed[[11, 1]]  # the best passage falls out of the top 10

    same = ranking_agreement([scores], [scores.copy()])
    swapped = ranking_agreement([scores, scores], [scores, one_swap])
    pairs = 12 * 11 / 2
    changed = ranking_agreement([scores], [top_changed])

    assert (same.top10_overlap, same.kendall_tau) == (1.0, pytest.approx(1.0))
    assert swapped.kendall_tau == pytest.approx((1.0 + (pairs - 2) / pairs) / 2)
    assert swapped.worst_kendall_tau == pytest.approx((pairs - 2) / pairs)
    assert changed.top10_overlap == pytest.approx(0.9)
    check_agreement("int8", swapped)
    with pytest.raises(AgreementError, match="Kendall tau"):
        check_agreement("fp16", ranking_agreement([scores], [-scores]))


def test_plain_export_writes_fp32_only_and_refuses_unchecked_variants(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "plain")
    assert model_dir.metadata.variants == {"fp32": "model.onnx"}
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="sample"):
        export_model_dir(
            build_model(tokenizer.get_vocab_size(), MAX_LENGTH),
            tokenizer,
            tmp_path / "x",
            name="x",
            max_query_tokens=16,
            max_length=MAX_LENGTH,
            variants=("fp32", "int8"),
        )


def test_ship_keeps_only_the_chosen_variants(graded_checkpoint: Path, tmp_path: Path) -> None:
    sample = graded_cases(4, GRADED_LEVELS, seed=2)
    model_dir = export_checkpoint(
        graded_checkpoint,
        tmp_path / "model",
        name="graded",
        sample=sample,
        sample_source="toy",
        ship=["int8", "fp16"],
    )
    meta = load_model_dir(model_dir.path).metadata
    assert meta.variants == {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
    assert not (model_dir.path / "model.onnx").exists()
    # The gates still ran against fp32 before it was left out.
    assert set(meta.training["export"]["agreement"]) == {"int8", "fp16"}


def test_an_activation_recorded_with_the_checkpoint_overrides_the_loss(
    graded_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(graded_checkpoint, checkpoint)
    provenance = checkpoint / PROVENANCE_FILE
    record = json.loads(provenance.read_text())
    provenance.write_text(json.dumps({**record, "loss": "bce", "activation": "identity"}))

    model_dir = export_checkpoint(
        checkpoint,
        tmp_path / "model",
        name="recorded",
        sample=graded_cases(6, GRADED_LEVELS, seed=1),
        sample_source="toy",
        variants=("fp32",),
    )

    assert load_model_dir(model_dir.path).metadata.activation == Activation.IDENTITY
