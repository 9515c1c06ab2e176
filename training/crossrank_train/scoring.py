"""Scorers: (query, passages) -> one score per passage, higher is more relevant.

Cross-encoders run either as a torch checkpoint or as an exported model directory through the
service's own engine; the baseline is the all-MiniLM-L6-v2 bi-encoder's cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import AutoModel, PreTrainedModel

from crossrank.core.scheduling import AUTO_BATCH_TOKENS, BatchLimits, RequestView, plan_batch
from crossrank.model.collate import PaddedBatch, pad_pairs
from crossrank.model.engine import CPU, OnnxEngine, plan_session
from crossrank.model.fp32_rebuild import FP32_FROM_FP16
from crossrank.model.model_dir import METADATA_FILE, load_model_dir
from crossrank.model.tokenization import EncodedPair, PairEncoder, PairTokenizer, load_pair_encoder
from crossrank.model.variant_choice import model_source
from crossrank.ops.settings import Settings
from crossrank_train.encoding import batch_feeds, to_tensors
from crossrank_train.models import (
    load_cross_encoder,
    read_provenance,
    tokenizer_file,
    uses_token_types,
)


class Scorer(Protocol):
    name: str

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """float32 scores, one per passage, in the passages' order."""
        ...


def score_in_batches(
    pairs: list[EncodedPair], batch_size: int, run: Callable[[PaddedBatch], np.ndarray]
) -> np.ndarray:
    """``run`` on length-sorted batches, its rows put back in the pairs' order (a row may be a
    score or a vector of them)."""
    # Batching pairs of similar length wastes less compute on padding.
    order = np.argsort([p.length for p in pairs], kind="stable")
    scores = np.empty(0, dtype=np.float32)
    for start in range(0, len(pairs), batch_size):
        rows = order[start : start + batch_size]
        out = run(pad_pairs([pairs[i] for i in rows]))
        if not start:
            scores = np.empty((len(pairs), *out.shape[1:]), dtype=np.float32)
        scores[rows] = out
    return scores


class TorchScorer:
    """A torch cross-encoder (in memory, e.g. mid-training) on the service's inputs."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PairTokenizer, batch_size: int = 32, name: str = ""
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name or model.config.name_or_path
        self._token_types = uses_token_types(model)

    def _run(self, batch: PaddedBatch) -> np.ndarray:
        logits = self.model(**to_tensors(batch_feeds(batch, self._token_types))).logits
        return logits[:, 0].float().numpy()

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                pairs = self.tokenizer.encode(query, list(passages)).pairs
                return score_in_batches(pairs, self.batch_size, self._run)
        finally:
            self.model.train(was_training)


def served_limits() -> BatchLimits:
    """The CPU service's batch limits under its default settings."""
    defaults = Settings.model_fields
    return BatchLimits(
        max_batch_tokens=defaults["max_batch_tokens"].default or AUTO_BATCH_TOKENS["cpu"],
        max_batch_pairs=defaults["max_batch_pairs"].default,
        # Waiting and aging order several requests; one request alone is cut the same by any.
        max_wait_s=0.0,
        aging_s=1.0,
    )


def served_batches(lengths: Sequence[int], limits: BatchLimits) -> Iterator[list[int]]:
    """The batches the service's planner forms for one request alone on the server: its pairs
    longest first, cut by the padded-token and pair limits (positions into ``lengths``)."""
    pending = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    while pending:
        view = RequestView(0, 0.0, pending, lengths, sorted_desc=True)
        taken = plan_batch([view], 0.0, limits).take[0]
        yield taken
        pending = pending[len(taken) :]


class OnnxScorer:
    """An ONNX cross-encoder run by the service's own OnnxEngine on CPU, in the batches the
    service forms under ``limits`` (``served_batches``): an int8 model's activations are
    quantised per batch, so a pair's score depends a little on the pairs it shares a batch
    with, and only the service's own batches give the served scores. The batches depend only on
    the pairs' lengths, so every variant of a model is scored on the same ones.
    """

    def __init__(
        self, model: Path | bytes, tokenizer: PairEncoder, limits: BatchLimits, name: str = ""
    ) -> None:
        # bytes: a graph built in memory (the service's fp32 rebuilt from fp16)
        self.engine = OnnxEngine(model, plan_session("cpu", [CPU]))
        self.tokenizer = tokenizer
        self.limits = limits
        self.name = name or (model.name if isinstance(model, Path) else "in-memory graph")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, variant: str, limits: BatchLimits) -> OnnxScorer:
        model = load_model_dir(model_dir)
        meta = model.metadata
        if variant != FP32_FROM_FP16:
            variant = model.choose_variant(variant, "cpu")
        source = model_source(model, variant)
        return cls(source, load_pair_encoder(model), limits, f"{meta.name} ({variant})")

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        pairs = self.tokenizer.encode(query, list(passages)).pairs
        scores = np.empty(len(pairs), dtype=np.float32)
        for rows in served_batches([p.length for p in pairs], self.limits):
            scores[rows] = self.engine.run(pad_pairs([pairs[i] for i in rows]))
        return scores


class BiEncoderScorer:
    """Cosine similarity of mean-pooled, normalised sentence embeddings (all-MiniLM-L6-v2's
    recipe): the re-ranking baseline a cross-encoder has to beat."""

    def __init__(
        self, checkpoint: str | Path, name: str, max_length: int = 256, batch_size: int = 32
    ) -> None:
        self.name = name
        self.model = AutoModel.from_pretrained(str(checkpoint), local_files_only=True).eval()
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file(checkpoint)))
        # all-MiniLM-L6-v2 was trained on inputs of at most 256 tokens.
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding()
        self.batch_size = batch_size

    def embed(self, texts: list[str], desc: str | None = None) -> torch.Tensor:
        """Unit-length embeddings, one row per text in order. With ``desc``, a progress bar."""
        # Batches of similar length waste less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        embeddings = torch.empty(len(texts), self.model.config.hidden_size)
        starts = range(0, len(texts), self.batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None):
                rows = order[start : start + self.batch_size]
                encodings = self.tokenizer.encode_batch([texts[i] for i in rows])
                ids = torch.tensor([e.ids for e in encodings])
                mask = torch.tensor([e.attention_mask for e in encodings])
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                embeddings[rows] = torch.nn.functional.normalize(pooled, dim=-1)
        return embeddings

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return (self.embed(list(passages)) @ self.embed([query])[0]).float().numpy()


def load_scorer(
    path: str | Path,
    *,
    variant: str = "auto",
    batch_size: int = 32,
    max_query_tokens: int | None = None,
    max_length: int | None = None,
) -> Scorer:
    """An exported model directory (it has crossrank.json) or a torch checkpoint directory.
    A model directory carries its token limits and is scored in the batches the CPU service
    forms, so its figures are the served model's; ``batch_size`` pairs a batch for a
    checkpoint, whose token limits default to those it was trained with (else 64 and 512)."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return OnnxScorer.from_model_dir(path, variant, served_limits())
    trained = read_provenance(path)
    tokenizer = PairTokenizer(
        tokenizer_file(path),
        max_query_tokens or trained.get("max_query_tokens", 64),
        max_length or trained.get("max_length", 512),
    )
    return TorchScorer(load_cross_encoder(path), tokenizer, batch_size, name=str(path))
