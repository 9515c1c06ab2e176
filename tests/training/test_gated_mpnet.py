"""The segment-gated MPNet starts exactly as its bi-encoder (token states, positions, relative
position buckets, no token types) and exports with parity through crossrank's export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import WORDS
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from toy_data import GRADED_LEVELS, graded_cases
from transformers import AutoModelForSequenceClassification, MPNetConfig, MPNetModel

from crossrank.model.collate import pad_pairs
from crossrank.model.engine import OnnxEngine, plan_session
from crossrank.model.model_dir import load_model_dir
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.export import PARITY_TOLERANCE, export_checkpoint
from crossrank_train.fetch_base import RECORD_FILE
from crossrank_train.gated_bert import lexical_match, pair_template_tokenizer, segments, term_idf
from crossrank_train.gated_mpnet import GatedMPNetForRanking, from_bi_encoder, main
from crossrank_train.models import PROVENANCE_FILE, load_cross_encoder, read_provenance

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "a cat",
    # Long enough for distances past MPNet's exact buckets (8) into its logarithmic ones.
    " ".join(WORDS[:30]) + " paris france capital " + " ".join(WORDS[30:45]),
    "france france france and paris",
]
MAX_QUERY_TOKENS, MAX_LENGTH = 16, 96


def mpnet_tokenizer() -> Tokenizer:
    """A word-level stand-in for MPNet's tokenizer: its special tokens and ids (<pad> is 1, the
    embeddings' padding_idx) and its single-text template, <s> text </s>."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab |= {word: i + len(vocab) for i, word in enumerate(dict.fromkeys(WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tokenizer


def bi_encoder_dir(root: Path) -> Path:
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=mpnet_tokenizer().get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH + 2,
    )
    model = MPNetModel(config, add_pooling_layer=False)
    with torch.no_grad():
        # Random init leaves MPNet's relative position bias near 0: make it matter.
        model.encoder.relative_attention_bias.weight.normal_(0, 2.0)
    out = root / "bi"
    model.save_pretrained(out)
    mpnet_tokenizer().save(str(out / "tokenizer.json"))
    return out


def bi_encoder_states(source: Path, texts: list[str]) -> list[torch.Tensor]:
    """Each text's token states from MPNetModel itself, the text alone: the bi-encoder."""
    bi = MPNetModel.from_pretrained(source).eval()
    states = []
    for text in texts:
        ids = torch.tensor([mpnet_tokenizer().encode(text).ids])
        with torch.no_grad():
            states.append(bi(input_ids=ids, attention_mask=torch.ones_like(ids))[0][0])
    return states


def feeds(root: Path) -> dict[str, torch.Tensor]:
    tokenizer_file = root / "pair-tokenizer.json"
    pair_template_tokenizer(mpnet_tokenizer(), "<s>", "</s>").save(str(tokenizer_file))
    pairs = PairTokenizer(tokenizer_file, MAX_QUERY_TOKENS, MAX_LENGTH).encode(QUERY, PASSAGES)
    batch = pad_pairs(pairs.pairs)
    return {
        "input_ids": torch.from_numpy(batch.input_ids),
        "attention_mask": torch.from_numpy(batch.attention_mask),
        "token_type_ids": torch.from_numpy(batch.token_type_ids),
    }


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_each_segment_is_encoded_as_the_bi_encoder_encodes_it_alone(tmp_path: Path) -> None:
    source = bi_encoder_dir(tmp_path)
    query, *passages = bi_encoder_states(source, [QUERY, *PASSAGES])
    model = from_bi_encoder(source).eval()
    inputs = feeds(tmp_path)
    assert inputs["input_ids"][0, 0] == 0 and not inputs["token_type_ids"][0, 0]
    with torch.no_grad():
        hidden = model.encode(**inputs)
    first, second = segments(inputs["attention_mask"], inputs["token_type_ids"])
    for row, passage in enumerate(passages):
        # Positions and relative buckets within each segment as alone; padding changes nothing.
        torch.testing.assert_close(hidden[row][first[row]], query, atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden[row][second[row]], passage, atol=1e-5, rtol=0)


def test_step_zero_scores_are_the_bi_encoder_cosines(tmp_path: Path) -> None:
    source = bi_encoder_dir(tmp_path)
    query, *passages = bi_encoder_states(source, [QUERY, *PASSAGES])
    expected = [float(unit(query.mean(0)) @ unit(p.mean(0))) for p in passages]
    model = from_bi_encoder(source, cosine_scale=20.0).eval()
    with torch.no_grad():
        logits = model(**feeds(tmp_path)).logits[:, 0]
    assert (logits / 20.0).tolist() == pytest.approx(expected, abs=1e-5)
    # The positions and the biases are what makes them equal: MPNet's own pair encoding (one
    # text, positions and distances running on) scores otherwise.
    assert len(set(np.round(expected, 3))) == len(expected)


def test_step_zero_adds_idf_maxsim_and_lexical_as_the_default_model(tmp_path: Path) -> None:
    source = bi_encoder_dir(tmp_path)
    query, *passages = bi_encoder_states(source, [QUERY, *PASSAGES])
    idf = term_idf(mpnet_tokenizer(), [*PASSAGES[:2], "a cat and a dog", "blue sky"])
    model = from_bi_encoder(source, 10.0, 10.0, maxsim_idf=True, lexical_scale=2.0, idf=idf).eval()
    inputs = feeds(tmp_path)
    first, second = segments(inputs["attention_mask"], inputs["token_type_ids"])
    weights = idf[0][inputs["input_ids"]] * first.float()
    lexical = lexical_match(inputs["input_ids"], weights, second, model.config.bm25)
    expected = []
    for row, passage in enumerate(passages):
        # MaxSim written out over the bi-encoder's own token states.
        best = (unit(query) @ unit(passage).T).amax(-1)
        w = weights[row][first[row]]
        maxsim = float((best * w).sum() / w.sum())
        cosine = float(unit(query.mean(0)) @ unit(passage.mean(0)))
        expected.append(10 * cosine + 10 * maxsim + 2 * float(lexical[row]))
    with torch.no_grad():
        logits = model(**inputs).logits[:, 0]
    assert logits.tolist() == pytest.approx(expected, abs=1e-4)
    assert float(lexical[0]) > 0 and float(lexical[1]) == 0  # "a cat" shares no query term


def test_opening_the_gates_mixes_the_segments_and_trains(tmp_path: Path) -> None:
    model = from_bi_encoder(bi_encoder_dir(tmp_path))
    inputs = feeds(tmp_path)
    model.eval()
    with torch.no_grad():
        closed = model(**inputs).logits[:, 0].clone()
        for layer in model.bert.encoder.layer:
            layer.attention.self.cross_gate.fill_(1.0)
        opened = model(**inputs).logits[:, 0]
    assert (opened - closed).abs().min() > 1e-4
    model.train()
    model(**inputs).logits.sum().backward()
    assert all(
        layer.attention.self.cross_gate.grad.abs().sum() > 0 for layer in model.bert.encoder.layer
    )


def test_the_step_zero_command_builds_a_checkpoint_export_reads(tmp_path: Path) -> None:
    source = bi_encoder_dir(tmp_path)
    record = {"base": "tiny", "source": "test", "weights_sha256": "0" * 64}
    (source / RECORD_FILE).write_text(json.dumps(record))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(PASSAGES))
    )
    out = tmp_path / "init"
    argv = ["--bi-encoder", str(source), "--out", str(out), "--maxsim-scale", "10", "--maxsim-idf"]
    assert main([*argv, "--lexical-scale", "2", "--idf-corpus", str(corpus)]) == 0
    model = load_cross_encoder(out)
    assert isinstance(model, GatedMPNetForRanking)
    assert model.config.model_type == "crossrank-gated-mpnet"
    assert model.config.maxsim_idf and model.config.lexical_scale == 2.0
    assert float(model.idf[0]) == 0.0  # <s>: special, no evidence
    saved = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert saved.encode("paris", "cat").ids == [
        0,
        4 + WORDS.index("paris"),
        2,
        0,
        4 + WORDS.index("cat"),
        2,
    ]
    assert saved.encode("paris", "cat").type_ids == [0, 0, 0, 1, 1, 1]
    provenance = read_provenance(out)
    assert provenance["activation"] == "identity"
    assert provenance["base_model"].startswith("tiny (test; weights sha256 000")
    assert (out / PROVENANCE_FILE).is_file()


def test_exports_with_parity_and_serves_the_torch_scores(tmp_path: Path) -> None:
    source = bi_encoder_dir(tmp_path)
    idf = term_idf(mpnet_tokenizer(), PASSAGES)
    model = from_bi_encoder(source, 10.0, 10.0, maxsim_idf=True, lexical_scale=2.0, idf=idf)
    with torch.no_grad():
        # A trained model's state: gates partly open, a head, scales moved.
        for layer in model.bert.encoder.layer:
            layer.attention.self.cross_gate.uniform_(0, 1)
        model.classifier.weight.normal_()
        model.cosine_scale.fill_(7.0)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    pair_template_tokenizer(mpnet_tokenizer(), "<s>", "</s>").save(
        str(checkpoint / "tokenizer.json")
    )
    (checkpoint / PROVENANCE_FILE).write_text(json.dumps({"activation": "identity"}))
    loaded = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    assert isinstance(loaded, GatedMPNetForRanking)

    sample = graded_cases(4, GRADED_LEVELS, seed=1)
    model_dir = export_checkpoint(
        checkpoint,
        tmp_path / "model",
        name="tiny-mpnet",
        sample=sample,
        sample_source="toy",
        variants=("fp32",),
        max_query_tokens=MAX_QUERY_TOKENS,
        max_length=MAX_LENGTH,
    )

    report = model_dir.metadata.training["export"]
    assert set(report["parity_max_abs_logit_delta"]) == {"exported", "fused"}
    assert max(report["parity_max_abs_logit_delta"].values()) <= PARITY_TOLERANCE
    meta = load_model_dir(model_dir.path).metadata
    tokenizer = PairTokenizer(model_dir.tokenizer_path, meta.max_query_tokens, meta.max_length)
    engine = OnnxEngine(
        model_dir.variant_path("fp32"), plan_session("cpu", ["CPUExecutionProvider"])
    )
    assert engine.uses_token_type_ids
    for case in [*sample, *graded_cases(1, 3, seed=2)]:
        batch = pad_pairs(tokenizer.encode(case.query, case.passages).pairs)
        with torch.no_grad():
            expected = loaded(
                input_ids=torch.from_numpy(batch.input_ids),
                attention_mask=torch.from_numpy(batch.attention_mask),
                token_type_ids=torch.from_numpy(batch.token_type_ids),
            ).logits[:, 0]
        np.testing.assert_allclose(engine.run(batch), expected.numpy(), atol=PARITY_TOLERANCE)
