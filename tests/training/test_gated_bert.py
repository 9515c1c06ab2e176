"""The segment-gated cross-encoder starts exactly as its bi-encoder and exports like any other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from gated_fixtures import REFERENCE, bi_encoder_dir, idf_table
from support import build_tokenizer
from transformers import AutoModelForSequenceClassification, BertModel

from crossrank.model.collate import pad_pairs
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.export import convert_fp16, export_onnx, fuse, head_nodes, onnx_logits
from crossrank_train.gated_bert import (
    BM25Params,
    GatedBertForRanking,
    from_bi_encoder,
    pair_template_tokenizer,
)
from crossrank_train.gated_bert import main as gated_bert_main
from crossrank_train.models import read_provenance
from crossrank_train.train import TrainConfig, _optimizer

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "the cat",
    "blue sky and river water over the city",
    "france france france and paris",  # a repeated term: BM25's saturation
]


def token_states(model: BertModel, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(text).ids])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]


def embed(model: BertModel, tokenizer, text: str) -> torch.Tensor:
    return torch.nn.functional.normalize(token_states(model, tokenizer, text).mean(0), dim=-1)


def max_sim(model: BertModel, tokenizer, query: str, passage: str) -> float:
    """ColBERT's MaxSim written out: each query token's best cosine, averaged."""
    q = torch.nn.functional.normalize(token_states(model, tokenizer, query), dim=-1)
    p = torch.nn.functional.normalize(token_states(model, tokenizer, passage), dim=-1)
    return float(np.mean([max(float(qi @ pj) for pj in p) for qi in q]))


def feeds(tmp_path: Path) -> dict[str, np.ndarray]:
    tokenizer_file = tmp_path / "tokenizer.json"
    pair_template_tokenizer(build_tokenizer()).save(str(tokenizer_file))
    batch = pad_pairs(PairTokenizer(tokenizer_file, 16, 128).encode(QUERY, PASSAGES).pairs)
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "token_type_ids": batch.token_type_ids,
    }


def test_step_zero_scores_are_the_bi_encoder_cosines(tmp_path: Path) -> None:
    source = bi_encoder_dir(tmp_path)
    bi = BertModel.from_pretrained(source).eval()
    tokenizer = build_tokenizer()
    query = embed(bi, tokenizer, QUERY)
    expected = [float(query @ embed(bi, tokenizer, p)) for p in PASSAGES]

    model = from_bi_encoder(source, cosine_scale=20.0).eval()
    inputs = {k: torch.from_numpy(v) for k, v in feeds(tmp_path).items()}
    with torch.no_grad():
        logits = model(**inputs).logits[:, 0]
    assert (logits / 20.0).tolist() == pytest.approx(expected, abs=1e-5)


def test_step_zero_with_maxsim_adds_the_bi_encoders_late_interaction(tmp_path: Path) -> None:
    source = bi_encoder_dir(tmp_path)
    bi = BertModel.from_pretrained(source).eval()
    tokenizer = build_tokenizer()
    query = embed(bi, tokenizer, QUERY)
    expected = [
        5.0 * float(query @ embed(bi, tokenizer, p)) + 3.0 * max_sim(bi, tokenizer, QUERY, p)
        for p in PASSAGES
    ]

    model = from_bi_encoder(source, cosine_scale=5.0, maxsim_scale=3.0).eval()
    inputs = {k: torch.from_numpy(v) for k, v in feeds(tmp_path).items()}
    with torch.no_grad():
        logits = model(**inputs).logits[:, 0]
    assert logits.tolist() == pytest.approx(expected, abs=1e-4)


def test_training_opens_the_cross_attention(tmp_path: Path) -> None:
    model = from_bi_encoder(bi_encoder_dir(tmp_path))
    inputs = {k: torch.from_numpy(v) for k, v in feeds(tmp_path).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(**inputs).logits[:, 0][None], torch.tensor([0]))
    loss.backward()
    optimizer.step()
    gates = torch.cat([layer.attention.self.cross_gate for layer in model.bert.encoder.layer])
    assert gates.abs().min() > 0
    assert model.classifier.weight.abs().sum() > 0


def test_term_idf_counts_documents_and_zeroes_special_tokens() -> None:
    tokenizer = build_tokenizer()
    idf, avg_length = idf_table()
    n = len(REFERENCE)
    lengths = [len(tokenizer.encode(t, add_special_tokens=False).ids) + 2 for t in REFERENCE]
    assert avg_length == pytest.approx(sum(lengths) / n)
    paris, cat, unseen = (tokenizer.token_to_id(w) for w in ("paris", "cat", "city"))
    assert idf[paris].item() == pytest.approx(np.log1p((n - 2 + 0.5) / 2.5))  # in 2 of 4
    assert idf[cat].item() == pytest.approx(np.log1p((n - 1 + 0.5) / 1.5))
    assert idf[unseen].item() == pytest.approx(np.log1p((n + 0.5) / 0.5))
    for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"):
        assert idf[tokenizer.token_to_id(special)].item() == 0.0


def bm25_by_hand(query: str, passage: str, idf: torch.Tensor, avg_length: float) -> float:
    """BM25 of the passage for the query's tokens, over the query's total IDF."""
    tokenizer = build_tokenizer()
    q = tokenizer.encode(query, add_special_tokens=False).ids
    p = tokenizer.encode(passage, add_special_tokens=False).ids
    k1, b, length = 1.2, 0.75, len(p) + 2  # the passage segment: [CLS] passage [SEP]
    total = sum(
        float(idf[t])
        * p.count(t)
        * (k1 + 1)
        / (p.count(t) + k1 * (1 - b + b * length / avg_length))
        for t in q
    )
    return total / sum(float(idf[t]) for t in q)


def test_step_zero_with_lexical_and_idf_maxsim_adds_bm25_and_weighted_late_interaction(
    tmp_path: Path,
) -> None:
    source = bi_encoder_dir(tmp_path)
    bi = BertModel.from_pretrained(source).eval()
    tokenizer = build_tokenizer()
    idf, avg_length = idf_table()
    query = embed(bi, tokenizer, QUERY)
    q_ids = tokenizer.encode(QUERY).ids
    q_tokens = torch.nn.functional.normalize(token_states(bi, tokenizer, QUERY), dim=-1)
    weights = idf[q_ids]

    def weighted_max_sim(passage: str) -> float:
        p_tokens = torch.nn.functional.normalize(token_states(bi, tokenizer, passage), dim=-1)
        best = (q_tokens @ p_tokens.T).amax(-1)
        return float((best * weights).sum() / weights.sum())

    expected = [
        5.0 * float(query @ embed(bi, tokenizer, p))
        + 3.0 * weighted_max_sim(p)
        + 2.0 * bm25_by_hand(QUERY, p, idf, avg_length)
        for p in PASSAGES
    ]
    model = from_bi_encoder(
        source,
        cosine_scale=5.0,
        maxsim_scale=3.0,
        maxsim_idf=True,
        lexical_scale=2.0,
        idf=(idf, avg_length),
    ).eval()
    inputs = {k: torch.from_numpy(v) for k, v in feeds(tmp_path).items()}
    with torch.no_grad():
        logits = model(**inputs).logits[:, 0]
        parts = model.score_parts(**inputs, every=True)
    assert logits.tolist() == pytest.approx(expected, abs=1e-4)
    assert set(parts) == {"cosine", "correction", "maxsim", "maxsim_idf", "lexical"}
    # "paris is the capital of france" matches the query's rare terms, "the cat" only "the"
    assert parts["lexical"][0] > parts["lexical"][1] > 0


def test_the_lexical_term_needs_an_idf_table(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IDF"):
        from_bi_encoder(bi_encoder_dir(tmp_path), lexical_scale=1.0)


@pytest.mark.parametrize(
    ("maxsim_scale", "maxsim_idf", "lexical_scale"),
    [(0.0, False, 0.0), (4.0, False, 0.0), (4.0, True, 0.0), (4.0, True, 2.0)],
)
def test_saves_loads_and_exports_with_parity(
    tmp_path: Path, maxsim_scale: float, maxsim_idf: bool, lexical_scale: float
) -> None:
    model = from_bi_encoder(
        bi_encoder_dir(tmp_path),
        maxsim_scale=maxsim_scale,
        maxsim_idf=maxsim_idf,
        lexical_scale=lexical_scale,
        idf=idf_table(),
    ).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.cross_gate.uniform_(0, 1)
        model.classifier.weight.normal_()
        # Trained scales differ from the config's initial ones: loading must keep them.
        model.cosine_scale.fill_(7.0)
        if model.maxsim_scale is not None:
            model.maxsim_scale.fill_(3.0)
        if model.lexical_scale is not None:
            model.lexical_scale.fill_(5.0)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()
    data = feeds(tmp_path)
    inputs = {k: torch.from_numpy(v) for k, v in data.items()}
    with torch.no_grad():
        want = model(**inputs).logits[:, 0].numpy()
        assert np.allclose(loaded(**inputs).logits[:, 0].numpy(), want, atol=1e-6)
    names = export_onnx(loaded, tmp_path / "model.onnx")
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    assert np.max(np.abs(onnx_logits(tmp_path / "model.onnx", data) - want)) <= 1e-4


def test_the_fp16_variant_keeps_the_similarities_and_the_head_in_fp32(tmp_path: Path) -> None:
    model = from_bi_encoder(
        bi_encoder_dir(tmp_path),
        maxsim_scale=4.0,
        maxsim_idf=True,
        lexical_scale=2.0,
        idf=idf_table(),
    ).eval()
    export_onnx(model, tmp_path / "plain.onnx")
    fuse(tmp_path / "plain.onnx", tmp_path / "fp32.onnx", model.config)
    fp32 = onnx.load(str(tmp_path / "fp32.onnx")).graph

    head = set(head_nodes(fp32))

    ops = {node.name: node.op_type for node in fp32.node}
    assert all(ops) and len(ops) == len(fp32.node)  # names are unique: the block list needs them
    # MaxSim (its ReduceMax), the token-id comparisons of the lexical term, the classifier
    assert {"ReduceMax", "Equal", "Gemm"} <= {ops[name] for name in head}
    assert not {"SkipLayerNormalization", "BiasGelu"} & {ops[name] for name in head}
    convert_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")
    types = {t.name: t.data_type for t in onnx.load(str(tmp_path / "fp16.onnx")).graph.initializer}
    head_weights = {name for node in fp32.node if node.name in head for name in node.input}
    floats = {t.name for t in fp32.initializer if t.dims and t.data_type == onnx.TensorProto.FLOAT}
    encoder_weights = floats - head_weights
    assert {types[name] for name in encoder_weights} == {onnx.TensorProto.FLOAT16}
    assert {types[t.name] for t in fp32.initializer if t.name in head_weights} <= {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.INT64,
    }
    data = feeds(tmp_path)
    want = onnx_logits(tmp_path / "fp32.onnx", data)
    assert np.max(np.abs(onnx_logits(tmp_path / "fp16.onnx", data) - want)) < 0.05


def test_gates_scales_and_base_learn_at_their_own_rates(tmp_path: Path) -> None:
    model = from_bi_encoder(bi_encoder_dir(tmp_path), maxsim_scale=4.0)
    config = TrainConfig(
        model=tmp_path, groups=tmp_path, out=tmp_path, lr=1e-5, head_lr=1e-3, gate_lr=3e-2
    )
    by_id = {id(p): name for name, p in model.named_parameters()}
    rates = {
        by_id[id(p)]: group["lr"]
        for group in _optimizer(model, config).param_groups
        for p in group["params"]
    }
    assert len(rates) == len(by_id)  # every parameter is trained, once
    assert rates["bert.encoder.layer.1.attention.self.cross_gate"] == 3e-2
    assert rates["maxsim_scale"] == rates["cosine_scale"] == rates["classifier.weight"] == 1e-3
    assert rates["bert.encoder.layer.1.attention.self.query.weight"] == 1e-5


def test_without_a_gate_rate_gates_train_in_the_heads_groups(tmp_path: Path) -> None:
    # The layout of runs from before --gate-lr, which a resumed run matches position by position.
    model = from_bi_encoder(bi_encoder_dir(tmp_path))
    config = TrainConfig(model=tmp_path, groups=tmp_path, out=tmp_path, lr=1e-5, head_lr=1e-3)
    by_id = {id(p): name for name, p in model.named_parameters()}
    groups = [
        (group["lr"], group["weight_decay"] > 0, {by_id[id(p)] for p in group["params"]})
        for group in _optimizer(model, config).param_groups
    ]
    assert [(lr, decays) for lr, decays, _ in groups] == [
        (1e-5, True),
        (1e-5, False),
        (1e-3, True),
        (1e-3, False),
    ]
    assert groups[2][2] == {"classifier.weight"}
    assert "bert.encoder.layer.0.attention.self.cross_gate" in groups[3][2]


def test_the_init_command_counts_idf_and_records_logits_that_are_no_log_odds(
    tmp_path: Path,
) -> None:
    source = bi_encoder_dir(tmp_path)
    build_tokenizer().save(str(source / "tokenizer.json"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(json.dumps({"_id": str(i), "text": t}) for i, t in enumerate(REFERENCE)) + "\n"
    )
    out = tmp_path / "init"

    argv = ["--bi-encoder", str(source), "--out", str(out), "--maxsim-scale", "2"]
    lexical = ["--lexical-scale", "1", "--lexical-k1", "0.9", "--lexical-b", "0.4"]
    assert gated_bert_main([*argv, *lexical, "--idf-corpus", str(corpus)]) == 0

    model = GatedBertForRanking.from_pretrained(out)
    assert torch.equal(model.idf, idf_table()[0])
    assert model.config.bm25 == BM25Params(0.9, 0.4, pytest.approx(idf_table()[1]))
    provenance = read_provenance(out)
    # The step-0 logits are scaled similarities: the export must not put them through a sigmoid.
    assert provenance["activation"] == "identity"
    assert provenance["idf_reference"] == ["corpus.jsonl"]


def test_checkpoints_from_before_the_idf_terms_load_as_they_were(tmp_path: Path) -> None:
    model = from_bi_encoder(bi_encoder_dir(tmp_path), maxsim_scale=4.0).eval()
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("maxsim_idf", "lexical_scale", "lexical_k1", "lexical_b", "lexical_avg_length"):
        del config[key]
    config_file.write_text(json.dumps(config))

    loaded = GatedBertForRanking.from_pretrained(tmp_path / "old").eval()

    assert loaded.idf is None and loaded.lexical_scale is None
    inputs = {k: torch.from_numpy(v) for k, v in feeds(tmp_path).items()}
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6)
