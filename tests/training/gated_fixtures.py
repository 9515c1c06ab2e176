"""Helpers for tests of the segment-gated model: a tiny BERT bi-encoder and an IDF table."""

from __future__ import annotations

from pathlib import Path

import torch
from support import build_tokenizer
from transformers import BertConfig, BertModel

from crossrank_train.gated_bert import term_idf


def bi_encoder_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=build_tokenizer().get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    out = tmp_path / "bi"
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    return out


REFERENCE = ["paris is the capital of france", "the river in paris", "a cat and a dog", "blue sky"]


def idf_table() -> tuple[torch.Tensor, float]:
    return term_idf(build_tokenizer(), REFERENCE)
