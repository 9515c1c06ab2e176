"""Weight-space ensembling: (1 - alpha) * start + alpha * tuned, refused for unrelated weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gated_fixtures import bi_encoder_dir, idf_table
from support import build_tokenizer

from crossrank.model.collate import pad_pairs
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.cli import main
from crossrank_train.gated_bert import GatedBertForRanking, from_bi_encoder, pair_template_tokenizer
from crossrank_train.interpolate import interpolate_checkpoints
from crossrank_train.models import (
    CheckpointError,
    load_cross_encoder,
    read_provenance,
    save_checkpoint,
)

QUERY = "what is the capital of france"
PASSAGES = ["paris is the capital of france", "the cat", "france france and paris", "blue sky"]


def _save(model: GatedBertForRanking, out: Path, tokenizer_file: Path, **provenance) -> Path:
    return save_checkpoint(model, tokenizer_file, out, {"base_model": "tiny", **provenance})


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A step-0 gated model and a copy 'fine-tuned' from it: every parameter moved."""
    tokenizer_file = tmp_path / "tokenizer.json"
    pair_template_tokenizer(build_tokenizer()).save(str(tokenizer_file))
    model = from_bi_encoder(
        bi_encoder_dir(tmp_path), maxsim_scale=4.0, lexical_scale=2.0, idf=idf_table()
    )
    start = _save(model, tmp_path / "start", tokenizer_file)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    tuned = _save(model, tmp_path / "tuned", tokenizer_file, loss="lce", max_length=96)
    return start, tuned


def _logits(checkpoint: Path) -> np.ndarray:
    model = load_cross_encoder(checkpoint).eval()
    batch = pad_pairs(
        PairTokenizer(checkpoint / "tokenizer.json", 16, 128).encode(QUERY, PASSAGES).pairs
    )
    inputs = {
        "input_ids": torch.from_numpy(batch.input_ids),
        "attention_mask": torch.from_numpy(batch.attention_mask),
        "token_type_ids": torch.from_numpy(batch.token_type_ids),
    }
    with torch.no_grad():
        return model(**inputs).logits[:, 0].numpy()


def test_the_ends_reproduce_start_and_tuned(pair: tuple[Path, Path], tmp_path: Path) -> None:
    start, tuned = pair
    assert not np.allclose(_logits(start), _logits(tuned), atol=1e-3)
    at_start = interpolate_checkpoints(start, tuned, 0.0, tmp_path / "a0")
    at_tuned = interpolate_checkpoints(start, tuned, 1.0, tmp_path / "a1")
    assert np.allclose(_logits(at_start), _logits(start), atol=1e-6)
    assert np.allclose(_logits(at_tuned), _logits(tuned), atol=1e-6)


def test_every_parameter_is_the_weighted_mean(pair: tuple[Path, Path], tmp_path: Path) -> None:
    start, tuned = pair
    mixed = load_cross_encoder(interpolate_checkpoints(start, tuned, 0.25, tmp_path / "mix"))
    first, second = load_cross_encoder(start), load_cross_encoder(tuned)
    tuned_params = dict(second.named_parameters())
    for name, param in first.named_parameters():
        want = 0.75 * param + 0.25 * tuned_params[name]
        assert torch.allclose(dict(mixed.named_parameters())[name], want, atol=1e-6), name
    assert torch.equal(mixed.idf, first.idf)
    # Non-persistent buffers are rebuilt at load, not left as whatever memory they were given.
    assert mixed.bert.embeddings.position_ids[0].tolist() == list(range(128))
    assert int(mixed.bert.embeddings.token_type_ids.abs().sum()) == 0

    provenance = read_provenance(tmp_path / "mix")
    assert provenance["interpolation"]["alpha"] == 0.25
    assert provenance["interpolation"]["tuned"] == str(tuned)
    # What export reads (the loss, the lengths trained at) follows the tuned model.
    assert (provenance["loss"], provenance["max_length"]) == ("lce", 96)


def test_unrelated_weights_are_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    start, tuned = pair
    other_idf = load_cross_encoder(tuned)
    with torch.no_grad():
        other_idf.idf.mul_(2.0)
    _save(other_idf, tmp_path / "idf", start / "tokenizer.json")
    with pytest.raises(CheckpointError, match="buffer idf differs"):
        interpolate_checkpoints(start, tmp_path / "idf", 0.5, tmp_path / "out")

    other_config = from_bi_encoder(bi_encoder_dir(tmp_path), maxsim_scale=4.0, idf=idf_table())
    _save(other_config, tmp_path / "config", start / "tokenizer.json")
    with pytest.raises(CheckpointError, match="lexical_scale"):
        interpolate_checkpoints(start, tmp_path / "config", 0.5, tmp_path / "out")

    other_tokenizer = tmp_path / "plain-tokenizer.json"
    build_tokenizer().save(str(other_tokenizer))
    _save(load_cross_encoder(tuned), tmp_path / "tok", other_tokenizer)
    with pytest.raises(CheckpointError, match="tokenize differently"):
        interpolate_checkpoints(start, tmp_path / "tok", 0.5, tmp_path / "out")

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_checkpoints(start, tuned, 1.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_writes_a_checkpoint_train_and_export_take(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start, tuned = pair
    args = ["interpolate", "--start", str(start), "--tuned", str(tuned), "--out"]
    assert main([*args, str(tmp_path / "mix"), "--alpha", "0.5"]) == 0
    written = json.loads((tmp_path / "mix" / "crossrank_train.json").read_text())
    assert written["interpolation"]["alpha"] == 0.5
    assert main([*args, str(tmp_path / "bad"), "--alpha", "-1"]) == 2
    assert "alpha must lie in [0, 1]" in capsys.readouterr().err
