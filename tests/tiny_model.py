"""A tiny random BERT cross-encoder and its tokenizer, built offline for the tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification

from crossrank.model_dir import ModelDir
from crossrank_train.export import export_model_dir

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "it",
    "are",
    "from",
    "at",
    "be",
    "this",
    "an",
    "which",
    "or",
    "query",
    "passage",
    "search",
    "rank",
    "model",
    "token",
    "batch",
    "score",
    "relevant",
    "answer",
    "question",
    "paris",
    "france",
    "capital",
    "city",
    "river",
    "cat",
    "dog",
    "sky",
    "blue",
    "red",
    "green",
    "water",
    "fire",
    "earth",
]


def build_tokenizer() -> Tokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab_list = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab_list += [w for w in WORDS if w not in vocab_list]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.add_special_tokens(specials)  # as a Hugging Face tokenizer.json registers them
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tokenizer


def build_model(vocab_size: int, max_length: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_length,
        num_labels=1,
    )
    config._attn_implementation = "eager"
    model = BertForSequenceClassification(config).eval()
    # A random head gives logits near 0 for every pair; a larger head spreads them, so that
    # ranking tests compare distinct scores.
    with torch.no_grad():
        model.classifier.weight.mul_(500.0)
    return model


def build_model_dir(out: Path, max_length: int = 128, max_query_tokens: int = 16) -> ModelDir:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer.get_vocab_size(), max_length)
    return export_model_dir(
        model,
        tokenizer,
        out,
        name="tiny-test-bert",
        max_query_tokens=max_query_tokens,
        max_length=max_length,
    )
