"""Tiny random-weight checkpoints of every encoder family `crossrank export` takes, each with a
tokenizer of its family's kind, saved as Hugging Face writes them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import support as tiny_tokenizers
import torch
from tokenizers import Tokenizer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from crossrank.model.model_dir import TOKENIZER_FILE

WINDOW = 128
# Weights drawn wider than the usual 0.02: at 0.02 a random network's attention is near uniform
# and every passage gets nearly the same logit, leaving no order to compare.
INIT_RANGE = 0.3
HEAD_SCALE = 10.0
SHAPE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "initializer_range": INIT_RANGE,
}


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: Callable[[], Tokenizer]
    config: Callable[[Tokenizer, int, int], PretrainedConfig]  # (tokenizer, labels, window)
    model: type[PreTrainedModel]
    segment_embeddings: bool  # the network takes token_type_ids
    attention_fused: bool  # onnxruntime's optimizer fuses its attention


def _bert(tok: Tokenizer, labels: int, window: int) -> PretrainedConfig:
    return BertConfig(
        vocab_size=tok.get_vocab_size(),
        intermediate_size=64,
        max_position_embeddings=window,
        num_labels=labels,
        **SHAPE,
    )


def _xlm_roberta(tok: Tokenizer, labels: int, window: int) -> PretrainedConfig:
    pad = tok.token_to_id("<pad>")
    # Positions start after the padding id: the table holds window + pad + 1 rows.
    return XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(),
        intermediate_size=64,
        max_position_embeddings=window + pad + 1,
        type_vocab_size=1,
        pad_token_id=pad,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        num_labels=labels,
        **SHAPE,
    )


def _deberta_v3(tok: Tokenizer, labels: int, window: int) -> PretrainedConfig:
    # DeBERTa-v3's own settings: relative positions only, no segment embeddings.
    return DebertaV2Config(
        vocab_size=tok.get_vocab_size(),
        intermediate_size=64,
        max_position_embeddings=window,
        type_vocab_size=0,
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        position_buckets=32,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pad_token_id=tok.token_to_id("[PAD]"),
        num_labels=labels,
        **SHAPE,
    )


def _electra(tok: Tokenizer, labels: int, window: int) -> PretrainedConfig:
    return ElectraConfig(
        vocab_size=tok.get_vocab_size(),
        embedding_size=16,
        intermediate_size=64,
        max_position_embeddings=window,
        num_labels=labels,
        **SHAPE,
    )


def _modernbert(tok: Tokenizer, labels: int, window: int) -> PretrainedConfig:
    # Three layers: one global, then two with a sliding window shorter than the test's pairs.
    return ModernBertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        initializer_range=INIT_RANGE,
        intermediate_size=64,
        max_position_embeddings=window,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        local_attention=16,
        classifier_pooling="mean",
        pad_token_id=tok.token_to_id("[PAD]"),
        cls_token_id=tok.token_to_id("[CLS]"),
        sep_token_id=tok.token_to_id("[SEP]"),
        bos_token_id=tok.token_to_id("[CLS]"),
        eos_token_id=tok.token_to_id("[SEP]"),
        num_labels=labels,
    )


FAMILIES = {
    f.name: f
    for f in (
        Family("bert", tiny_tokenizers.wordpiece, _bert, BertForSequenceClassification, True, True),
        Family(
            "xlm-roberta",
            tiny_tokenizers.xlm_roberta,
            _xlm_roberta,
            XLMRobertaForSequenceClassification,
            False,
            True,
        ),
        Family(
            "deberta-v2",
            tiny_tokenizers.deberta_v3,
            _deberta_v3,
            DebertaV2ForSequenceClassification,
            False,
            False,
        ),
        Family(
            "electra",
            tiny_tokenizers.wordpiece,
            _electra,
            ElectraForSequenceClassification,
            True,
            True,
        ),
        Family(
            "modernbert",
            tiny_tokenizers.modernbert,
            _modernbert,
            ModernBertForSequenceClassification,
            False,
            False,
        ),
    )
}


def save_family_checkpoint(
    family: Family, out: Path, labels: int = 1, window: int = WINDOW, seed: int = 0
) -> Path:
    """A random network of the family, its classifier scaled up so that pairs' logits lie
    far enough apart to have one order, and its tokenizer; tokenizer_config.json states the
    window as Hugging Face tokenizers do."""
    torch.manual_seed(seed)
    tokenizer = family.tokenizer()
    model = family.model(family.config(tokenizer, labels, window)).eval()
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        classifier.weight.mul_(HEAD_SCALE)
    model.save_pretrained(str(out))
    tokenizer.save(str(out / TOKENIZER_FILE))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": window}))
    return out
