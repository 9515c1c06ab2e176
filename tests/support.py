"""What the service tests share: a tiny random BERT cross-encoder and tokenizers of every kind
the model families ship, built offline; a real crossrank server on loopback with an engine a
test can gate, fail and watch; and helpers to read its metrics and wait for a condition."""

from __future__ import annotations

import os
import random
import re
import socket
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import BertConfig, BertForSequenceClassification

from crossrank.http.app import create_app
from crossrank.http.errors import ErrorResponder
from crossrank.http.server import DrainingServer, uvicorn_config
from crossrank.model.collate import PaddedBatch
from crossrank.model.engine import OnnxEngine, SessionPlan
from crossrank.model.model_dir import ModelDir
from crossrank.ops.metrics import Metrics
from crossrank.ops.settings import Settings
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


def build_model_dir(
    out: Path,
    max_length: int = 128,
    max_query_tokens: int = 16,
    seed: int = 0,
    name: str = "tiny-test-bert",
) -> ModelDir:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer.get_vocab_size(), max_length, seed)
    return export_model_dir(
        model,
        tokenizer,
        out,
        name=name,
        max_query_tokens=max_query_tokens,
        max_length=max_length,
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


class GatedEngine:
    """The real engine behind a gate the test opens, and a switch that makes it raise."""

    def __init__(self, model_file: Path, plan: SessionPlan, closed: bool = False) -> None:
        self.inner = OnnxEngine(model_file, plan)
        self.provider = self.inner.provider
        self.uses_token_type_ids = self.inner.uses_token_type_ids
        self.gate = threading.Event()
        if not closed:
            self.gate.set()
        self.entered = threading.Semaphore(0)
        self.fail_when: Callable[[PaddedBatch], bool] = lambda batch: False
        self.delay_s = 0.0  # every batch takes at least this long
        self.batches: list[int] = []
        self.padded_tokens: list[int] = []

    def run(self, batch: PaddedBatch) -> np.ndarray:
        self.entered.release()
        assert self.gate.wait(30), "test gate never opened"
        if self.fail_when(batch):
            raise RuntimeError("injected engine fault")
        time.sleep(self.delay_s)
        self.batches.append(batch.pairs)
        self.padded_tokens.append(batch.padded_tokens)
        return self.inner.run(batch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, server: DrainingServer, thread: threading.Thread, url: str, app) -> None:
        self.server = server
        self.thread = thread
        self.url = url
        self.app = app
        self.engine: GatedEngine | None = None  # the first model's, when gated
        self.engines: list[GatedEngine] = []  # every model's, in the order they were built

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if c.get("/ready").status_code == 200:
                    return
                time.sleep(0.02)
        raise TimeoutError("server never became ready")

    def retry_after(self, pairs: int | None = None) -> str:
        """The Retry-After a refusal of ``pairs`` more pairs (None: of an uncounted request)
        carries now: the default model's measured drain time for the room ahead, rounded up
        within the server's bounds. It depends on the machine's speed, so a test compares the
        header with it rather than with a number; nothing may finish meanwhile (a gated engine)
        or the estimate moves."""
        service = self.app.state.service
        error = service.resolve(None).admission.refusal(pairs)
        assert error is not None and error.retry_after_s is not None, "no measured refusal"
        settings = service.settings
        respond = ErrorResponder(Metrics(), settings.retry_after_s, settings.retry_after_max_s)
        return respond(error, {"type": "http", "path": "/rerank"}).headers["Retry-After"]


@contextmanager
def run_server(
    directory: ModelDir, gated: bool = False, hold_warm_up: bool = False, **overrides
) -> Iterator[RunningServer]:
    """A real uvicorn server on loopback, in a thread, with the given settings. With
    ``hold_warm_up`` the gated engine starts closed: the warm-up cannot finish before the test
    opens the gate (closing it after start races a fast warm-up)."""
    port = free_port()
    overrides.setdefault("model", directory.path)  # several: model=[...] or models_file
    settings = Settings(host="127.0.0.1", port=port, threads=1, **overrides)
    engines: list[GatedEngine] = []

    def factory(path: Path, plan: SessionPlan):
        if not gated:
            return OnnxEngine(path, plan)
        engines.append(GatedEngine(path, plan, closed=hold_warm_up))
        return engines[-1]

    app = create_app(settings, engine_factory=factory)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, on_stop=app.state.service.begin_drain)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        time.sleep(0.01)
    running = RunningServer(server, thread, f"http://127.0.0.1:{port}", app)
    running.engines = engines
    running.engine = engines[0] if engines else None
    try:
        yield running
    finally:
        for engine in engines:
            engine.gate.set()
        server.should_exit = True
        thread.join(30)


def metric(srv: RunningServer, series: str) -> float:
    with srv.client() as c:
        return metric_value(c.get("/metrics").text, series)


def metric_value(text: str, series: str) -> float:
    """The sum of the samples of ``series`` (``name`` or ``name{label="value",...}``) in a
    /metrics text over every series whose labels include the ones given: a ``model`` label
    left out sums over the models."""
    name, _, labels = series.partition("{")
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    ]
    if not found:
        raise AssertionError(f"no series {series}")
    return sum(found)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def missing_tool(reason: str) -> NoReturn:
    """A deploy test's tool is missing. Where `make test` installs every tool (as root with apt,
    as CI runs; it then sets CROSSRANK_DEPLOY_TOOLS=required) that is a failure; elsewhere the
    test skips, saying which tool and why, and the rest of the suite still runs."""
    if os.environ.get("CROSSRANK_DEPLOY_TOOLS") == "required":
        pytest.fail(f"{reason}, though make deploy-tools was to install it")
    # Skip, not fail: a developer without root or apt (make deploy-tools cannot install the
    # tool) still runs the rest of the suite; CI, as root, takes the pytest.fail branch above.
    pytest.skip(reason)  # why: the tool cannot be had here (see above); never under CI
