"""Tiny tokenizers of every kind the model families ship (WordPiece, Unigram, byte-level BPE),
trained by `tokenizers` on a few generated sentences, with each family's pair template."""

from __future__ import annotations

import random

from tiny_model import WORDS
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def sentences(count: int = 300, seed: int = 0) -> list[str]:
    """Random sentences over the test vocabulary, and the answers an LLM reranker compares on
    lines of their own, so a BPE learns each as one token."""
    rng = random.Random(seed)
    lines = [" ".join(rng.sample(WORDS, 8)) for _ in range(count)]
    return lines + ["yes", "no", "Yes", "No"] * 50


def _template(cls: str, sep: str, vocab: Tokenizer, pair: str) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=pair,
        special_tokens=[(cls, vocab.token_to_id(cls)), (sep, vocab.token_to_id(sep))],
    )


def wordpiece() -> Tokenizer:
    """BERT's and ELECTRA's kind: [CLS] A [SEP] B [SEP], segment ids 0 then 1."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    tokenizer.train_from_iterator(sentences(), trainer)
    tokenizer.post_processor = _template("[CLS]", "[SEP]", tokenizer, "[CLS] $A [SEP] $B:1 [SEP]:1")
    return tokenizer


def unigram(specials: list[str], cls: str, sep: str, pair: str) -> Tokenizer:
    """SentencePiece's kind (XLM-R, DeBERTa-v3): Unigram over Metaspace pieces."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=specials, unk_token=specials[-1]
    )
    tokenizer.train_from_iterator(sentences(), trainer)
    tokenizer.post_processor = _template(cls, sep, tokenizer, pair)
    return tokenizer


def xlm_roberta() -> Tokenizer:
    """<s> A </s></s> B </s>, no segments; <pad> is id 1, as XLM-R's position scheme expects."""
    return unigram(["<s>", "<pad>", "</s>", "<unk>"], "<s>", "</s>", "<s> $A </s> </s> $B </s>")


def deberta_v3() -> Tokenizer:
    return unigram(
        ["[PAD]", "[CLS]", "[SEP]", "[UNK]"], "[CLS]", "[SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"
    )


def byte_level_bpe(specials: list[str], vocab_size: int = 600) -> Tokenizer:
    """GPT-2's kind (RoBERTa, ModernBERT, Qwen): byte-level BPE, no unknown tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(sentences(), trainer)
    return tokenizer


def modernbert() -> Tokenizer:
    tokenizer = byte_level_bpe(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.post_processor = _template("[CLS]", "[SEP]", tokenizer, "[CLS] $A [SEP] $B [SEP]")
    return tokenizer


def qwen() -> Tokenizer:
    """A Qwen-style tokenizer: byte-level BPE, chat specials, nothing added around a text."""
    tokenizer = byte_level_bpe(QWEN_SPECIALS)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


# Qwen3-Reranker's prompt (its model card's), as a crossrank prompt template.
QWEN3_RERANKER_PROMPT = {
    "prefix": "<|im_start|>system\nJudge whether the Document meets the requirements based on "
    'the Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
    "<|im_end|>\n<|im_start|>user\n<Instruct>: {instruction}\n<Query>: ",
    "separator": "\n<Document>: ",
    "suffix": "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "instruction": "Given a web search query, retrieve relevant passages that answer the query",
}
