"""LLM rerankers: a tiny random Qwen3 causal LM with a tiny byte-level BPE, exported by `crossrank
export` with Qwen3-Reranker's prompt template, scored as logit(yes) - logit(no) at the last real
token whatever the padding side, served over HTTP as the torch model scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import QWEN3_RERANKER_PROMPT, RunningServer, qwen, run_server
from toy_data import GRADED_LEVELS, graded_cases, graded_groups
from transformers import Qwen3Config, Qwen3ForCausalLM

from crossrank.model.model_dir import (
    METADATA_FILE,
    TOKENIZER_FILE,
    Activation,
    ModelDir,
    load_model_dir,
)
from crossrank.model.tokenization import EncodedPair, PromptTokenizer, load_pair_encoder
from crossrank_train.cli import main
from crossrank_train.export import PARITY_TOLERANCE, quantize_int8, vector_matmuls
from crossrank_train.groups import write_groups

WINDOW = 512
CASES = graded_cases(2, 6, seed=13)


@pytest.fixture(scope="module")
def llm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen3")
    tokenizer = qwen()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=WINDOW,
        # Wider than the usual 0.02, so that passages get logits far enough apart to rank.
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(config).eval().save_pretrained(str(out))
    tokenizer.save(str(out / TOKENIZER_FILE))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm-files")
    write_groups(root / "groups.jsonl", graded_groups(3, 3, seed=5, levels=GRADED_LEVELS))
    (root / "prompt.json").write_text(json.dumps(QWEN3_RERANKER_PROMPT))
    return {"groups": root / "groups.jsonl", "prompt": root / "prompt.json"}


def export(
    checkpoint: Path, out: Path, files: dict[str, Path], *extra: str, variants: str = "fp32"
) -> int:
    args = ["export", "--model", str(checkpoint), "--out", str(out), "--name", "tiny-qwen3"]
    return main([*args, "--variants", *variants.split(), "--sample", str(files["groups"]), *extra])


@pytest.fixture(scope="module")
def llm_model_dir(
    llm_checkpoint: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> ModelDir:
    out = tmp_path_factory.mktemp("llm-export") / "model"
    prompt = ["--prompt", str(files["prompt"])]
    assert export(llm_checkpoint, out, files, *prompt, variants="fp32 fp16") == 0
    return load_model_dir(out)


def torch_yes_no(checkpoint: Path, pairs: list[EncodedPair]) -> np.ndarray:
    """Each pair alone through the whole LM as transformers loads it: logit(yes) - logit(no)
    of the next token after the last."""
    model = Qwen3ForCausalLM.from_pretrained(str(checkpoint)).eval()
    vocab = qwen()
    yes, no = vocab.token_to_id("yes"), vocab.token_to_id("no")
    with torch.inference_mode():
        rows = [model(input_ids=torch.from_numpy(p.input_ids)[None]).logits[0, -1] for p in pairs]
    return np.array([float(row[yes] - row[no]) for row in rows])


def padded(pairs: list[EncodedPair], left: bool) -> dict[str, np.ndarray]:
    length = max(p.length for p in pairs)
    ids = np.zeros((len(pairs), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, pair in enumerate(pairs):
        span = slice(length - pair.length, length) if left else slice(0, pair.length)
        ids[row, span] = pair.input_ids
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_the_export_records_the_template_and_the_yes_no_head(llm_model_dir: ModelDir) -> None:
    meta = llm_model_dir.metadata
    vocab = qwen()
    assert meta.prompt is not None
    assert meta.prompt.model_dump() == QWEN3_RERANKER_PROMPT
    assert isinstance(load_pair_encoder(llm_model_dir), PromptTokenizer)
    # P(yes) over {yes, no} is the sigmoid of the difference.
    assert meta.activation is Activation.SIGMOID
    assert (meta.max_length, meta.max_query_tokens) == (WINDOW, 64)
    report = meta.training["export"]
    assert report["head"] == {
        "kind": "yes-no",
        "yes": {"word": "yes", "id": vocab.token_to_id("yes")},
        "no": {"word": "no", "id": vocab.token_to_id("no")},
    }
    assert max(report["parity_max_abs_logit_delta"].values()) <= PARITY_TOLERANCE
    assert report["optimizer"]["optimizer_model_type"] == "qwen3"
    assert report["fused_operators"].get("SkipSimplifiedLayerNormalization")
    # The GPU variant passed its agreement gate against fp32 on the sample.
    assert set(meta.variants) == {"fp32", "fp16"} and "fp16" in report["agreement"]


def test_int8_keeps_the_yes_no_product_in_fp32(llm_model_dir: ModelDir, tmp_path: Path) -> None:
    fp32 = llm_model_dir.variant_path("fp32")
    kept = vector_matmuls(onnx.load(str(fp32)).graph)
    assert len(kept) == 1  # hidden state . (w_yes - w_no)
    quantize_int8(fp32, tmp_path / "int8.onnx")
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    ops = {node.name: node.op_type for node in graph.node}
    assert ops[kept[0]] == "MatMul"
    assert any(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops.values())
    case = CASES[0]
    pairs = load_pair_encoder(llm_model_dir).encode(case.query, case.passages).pairs
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    scores = session.run(None, padded(pairs, left=False))[0]
    assert scores.shape == (len(pairs),) and np.all(np.isfinite(scores))


def test_left_and_right_padding_give_the_torch_scores(
    llm_model_dir: ModelDir, llm_checkpoint: Path
) -> None:
    encoder = load_pair_encoder(llm_model_dir)
    case = CASES[0]
    # Pairs of different lengths, so that both paddings put pad tokens in every position.
    passages = [p * (1 + i % 3) for i, p in enumerate(case.passages)]
    pairs = encoder.encode(case.query, passages).pairs
    assert len({p.length for p in pairs}) > 1
    session = ort.InferenceSession(
        str(llm_model_dir.variant_path("fp32")), providers=["CPUExecutionProvider"]
    )
    right = session.run(None, padded(pairs, left=False))[0]
    left = session.run(None, padded(pairs, left=True))[0]
    want = torch_yes_no(llm_checkpoint, pairs)
    np.testing.assert_allclose(left, right, atol=1e-5)
    assert np.max(np.abs(right - want)) <= PARITY_TOLERANCE
    assert np.ptp(want) > 100 * PARITY_TOLERANCE


def test_served_over_http_as_torch_scores(llm_model_dir: ModelDir, llm_checkpoint: Path) -> None:
    encoder = load_pair_encoder(llm_model_dir)
    with run_server(llm_model_dir, max_wait_ms=5) as server:
        server.wait_ready()
        with server.client() as client:
            for case in CASES:
                body = {"query": case.query, "passages": case.passages, "raw_scores": True}
                r = client.post("/rerank", json=body)
                assert r.status_code == 200, r.text
                got = np.empty(len(case.passages))
                for result in r.json()["results"]:
                    got[result["index"]] = result["score"]
                want = torch_yes_no(llm_checkpoint, encoder.encode(case.query, case.passages).pairs)
                assert np.max(np.abs(got - want)) <= PARITY_TOLERANCE
                assert np.argsort(-got).tolist() == np.argsort(-want).tolist()


def test_a_request_replaces_the_instruction(
    llm_model_dir: ModelDir, llm_checkpoint: Path, server: RunningServer
) -> None:
    encoder = load_pair_encoder(llm_model_dir)
    case = CASES[1]
    own = "Find the passages that say relevant most often"
    body = {"query": case.query, "passages": case.passages, "raw_scores": True}
    with run_server(llm_model_dir, max_wait_ms=5) as llm:
        llm.wait_ready()
        with llm.client() as client:
            r = client.post("/rerank", json={**body, "instruction": own})
            default = client.post("/rerank", json=body)
    assert r.status_code == 200, r.text
    got = np.empty(len(case.passages))
    for result in r.json()["results"]:
        got[result["index"]] = result["score"]
    pairs = encoder.encode(case.query, case.passages, instruction=own).pairs
    want = torch_yes_no(llm_checkpoint, pairs)
    assert np.max(np.abs(got - want)) <= PARITY_TOLERANCE
    defaults = {x["index"]: x["score"] for x in default.json()["results"]}
    assert not np.allclose(got, [defaults[i] for i in range(len(got))])
    # The tests' tiny BERT has no prompt: an instruction is a 422 naming the field.
    with server.client() as client:
        r = client.post("/rerank", json={**body, "instruction": own})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "instruction"


def test_refusals(
    llm_checkpoint: Path, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompt = ["--prompt", str(files["prompt"])]
    # "maybe" is no single token of the tiny vocabulary.
    assert export(llm_checkpoint, tmp_path / "a", files, *prompt, "--yes-no", "maybe", "no") == 2
    assert "'maybe' is 4 tokens for this tokenizer, not one" in capsys.readouterr().err
    assert export(llm_checkpoint, tmp_path / "b", files) == 2
    assert "needs its prompt template (--prompt)" in capsys.readouterr().err
    assert not (tmp_path / "a" / METADATA_FILE).exists()
    assert not (tmp_path / "b" / METADATA_FILE).exists()
