"""Every encoder family `crossrank export` takes: a tiny random checkpoint of each, exported by
the command, served over real HTTP, and scored as the torch model scores the same pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from family_checkpoints import FAMILIES, WINDOW, Family, save_family_checkpoint
from support import WORDS, RunningServer, run_server
from tokenizers import Tokenizer
from toy_data import GRADED_LEVELS, graded_cases, graded_groups
from transformers import AutoModelForSequenceClassification

from crossrank.model.model_dir import METADATA_FILE, TOKENIZER_FILE, Activation, load_model_dir
from crossrank.model.tokenization import load_pair_encoder
from crossrank_train.cli import main
from crossrank_train.export import PARITY_TOLERANCE
from crossrank_train.groups import write_groups

CASES = graded_cases(2, 8, seed=11)


@pytest.fixture(scope="module")
def sample_groups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "groups.jsonl"
    write_groups(path, graded_groups(3, 3, seed=5, levels=GRADED_LEVELS))
    return path


def export(checkpoint: Path, out: Path, groups: Path, *extra: str) -> int:
    args = ["export", "--model", str(checkpoint), "--out", str(out), "--name", out.name]
    return main([*args, "--variants", "fp32", "--sample", str(groups), *extra])


def torch_logits(checkpoint: Path, family: Family, query: str, passages: list[str]) -> np.ndarray:
    """Each pair alone (no padding), encoded by the checkpoint's own tokenizer.json, through
    the network as transformers loads it (its default attention, not the exported eager one)."""
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    tokenizer = Tokenizer.from_file(str(checkpoint / TOKENIZER_FILE))
    rows = []
    with torch.inference_mode():
        for passage in passages:
            enc = tokenizer.encode(query, passage)
            inputs = {"input_ids": torch.tensor([enc.ids])}
            if family.segment_embeddings:
                inputs["token_type_ids"] = torch.tensor([enc.type_ids])
            rows.append(model(**inputs).logits[0].numpy())
    return np.stack(rows)


def served(server: RunningServer, query: str, passages: list[str], raw: bool) -> np.ndarray:
    with server.client() as client:
        r = client.post("/rerank", json={"query": query, "passages": passages, "raw_scores": raw})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    scores = np.empty(len(passages))
    for result in results:
        scores[result["index"]] = result["score"]
    return scores


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_exported_served_and_scored_as_torch(
    name: str, sample_groups: Path, tmp_path: Path
) -> None:
    family = FAMILIES[name]
    # ELECTRA rerankers commonly carry two labels: it stands for the two-label form here.
    labels = 2 if name == "electra" else 1
    checkpoint = save_family_checkpoint(family, tmp_path / "checkpoint", labels=labels)
    extra = ["--two-label-score", "softmax"] if labels == 2 else []
    assert export(checkpoint, tmp_path / name, sample_groups, *extra) == 0

    model = load_model_dir(tmp_path / name)
    meta = model.metadata
    report = meta.training["export"]
    # The window is the checkpoint's; the query budget a quarter of it.
    assert (meta.max_length, meta.max_query_tokens) == (WINDOW, WINDOW // 4)
    assert max(report["parity_max_abs_logit_delta"].values()) <= PARITY_TOLERANCE
    assert report["optimizer"]["known_to_optimizer"] == family.attention_fused
    assert bool(report["fused_operators"].get("Attention")) == family.attention_fused
    inputs = {i.name for i in onnx.load(str(model.variant_path("fp32"))).graph.input}
    assert ("token_type_ids" in inputs) == family.segment_embeddings
    # The pairs are the checkpoint tokenizer's own pair template's.
    tokenizer = Tokenizer.from_file(str(model.tokenizer_path))
    case = CASES[0]
    pair = load_pair_encoder(model).encode(case.query, case.passages[:1]).pairs[0]
    assert pair.input_ids.tolist() == tokenizer.encode(case.query, case.passages[0]).ids
    if name == "xlm-roberta":
        ids = pair.input_ids.tolist()
        eos = tokenizer.token_to_id("</s>")
        assert ids[0] == tokenizer.token_to_id("<s>") and ids[-1] == eos
        assert ids.count(eos) == 3 and ids[ids.index(eos) + 1] == eos  # <s> A </s></s> B </s>
    if labels == 2:
        assert meta.activation is Activation.SIGMOID
        assert report["head"] == {
            "kind": "classifier",
            "labels": 2,
            "score": "softmax",
            "positive_label": 1,
        }

    with run_server(model, max_wait_ms=5) as server:
        server.wait_ready()
        for case in CASES:
            want = torch_logits(checkpoint, family, case.query, case.passages)
            logit = want[:, 0] if labels == 1 else want[:, 1] - want[:, 0]
            got = served(server, case.query, case.passages, raw=True)
            assert np.max(np.abs(got - logit)) <= PARITY_TOLERANCE
            assert np.argsort(-got).tolist() == np.argsort(-logit).tolist()
            assert np.ptp(logit) > 100 * PARITY_TOLERANCE  # an order to keep, not ties
            if labels == 2:
                probability = torch.softmax(torch.from_numpy(want), dim=-1)[:, 1].numpy()
                got = served(server, case.query, case.passages, raw=False)
                # The sigmoid's slope is at most 1/4: the logits' gate, carried over.
                np.testing.assert_allclose(got, probability, atol=PARITY_TOLERANCE / 4)


def test_two_labels_need_an_explicit_recorded_choice(sample_groups: Path, tmp_path: Path) -> None:
    checkpoint = save_family_checkpoint(FAMILIES["bert"], tmp_path / "checkpoint", labels=2)
    assert export(checkpoint, tmp_path / "unsaid", sample_groups) == 2
    assert not (tmp_path / "unsaid" / METADATA_FILE).exists()

    assert (
        export(checkpoint, tmp_path / "diff", sample_groups, "--two-label-score", "difference") == 0
    )
    meta = load_model_dir(tmp_path / "diff").metadata
    assert meta.activation is Activation.IDENTITY
    assert meta.training["export"]["head"]["score"] == "difference"
    # A one-label checkpoint refuses the two-label choice rather than ignoring it.
    single = save_family_checkpoint(FAMILIES["bert"], tmp_path / "single")
    assert export(single, tmp_path / "x", sample_groups, "--two-label-score", "softmax") == 2


LONG_WINDOW = 4096


def test_a_long_window_serves_as_set_and_the_token_budget_bounds_every_batch(
    sample_groups: Path, tmp_path: Path
) -> None:
    """An XLM-R of the 8k-position class, scaled down: max_length is its window, and the
    batcher's padded-token budget, not the window, bounds what one batch holds (and so the
    activations' memory): a pair near the window runs alone, short ones share batches."""
    family = FAMILIES["xlm-roberta"]
    checkpoint = save_family_checkpoint(family, tmp_path / "checkpoint", window=LONG_WINDOW)
    assert export(checkpoint, tmp_path / "long", sample_groups) == 0
    model = load_model_dir(tmp_path / "long")
    assert model.metadata.max_length == LONG_WINDOW

    query = "capital of france"
    long = [" ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in (900, 500)]
    short = [case.passages[0] for case in CASES]
    passages = [*long, *short]
    budget = LONG_WINDOW
    with run_server(model, gated=True, max_batch_tokens=budget, max_wait_ms=5) as server:
        server.wait_ready()
        got = served(server, query, passages, raw=True)
        engine = server.engine
        assert engine is not None
        batches = list(zip(engine.batches, engine.padded_tokens, strict=True))
    want = torch_logits(checkpoint, family, query, passages)[:, 0]
    lengths = load_pair_encoder(model).encode(query, passages).pairs
    assert max(p.length for p in lengths) > budget // 2  # the longest pair cannot share
    assert all(padded <= budget for _, padded in batches)
    # Warm-up ran the window's full length, alone; the request's longest pair ran alone too.
    assert (1, LONG_WINDOW) in batches
    assert any(pairs == 1 and padded > budget // 2 for pairs, padded in batches[-3:])
    assert np.max(np.abs(got - want)) <= PARITY_TOLERANCE
