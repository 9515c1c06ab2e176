"""Local Hugging Face checkpoints: loading a one-logit cross-encoder and saving one back.

A checkpoint directory is what ``save_pretrained`` writes plus ``tokenizer.json`` (a Hugging
Face ``tokenizers`` file), and, once crossrank trained it, ``crossrank_train.json`` (provenance
that ``crossrank export`` copies into the model directory's metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from crossrank.model.model_dir import TOKENIZER_FILE
from crossrank_train import gated_bert, gated_mpnet  # noqa: F401  (register their model types)

PROVENANCE_FILE = "crossrank_train.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory crossrank cannot use, with what to fix."""


def tokenizer_file(checkpoint: str | Path) -> Path:
    path = Path(checkpoint) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint} has no {TOKENIZER_FILE}: crossrank tokenizes with the `tokenizers` "
            "file a fast Hugging Face tokenizer saves"
        )
    return path


def load_cross_encoder(checkpoint: str | Path, num_labels: int = 1) -> PreTrainedModel:
    """A sequence classifier with ``num_labels`` outputs (one unless the export says two). Eager
    attention, so the exported graph has the pattern onnxruntime's optimizer fuses into its
    Attention op; never touches the network."""
    tokenizer_file(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(checkpoint), num_labels=num_labels, attn_implementation="eager", local_files_only=True
    )
    return model.float()


def load_causal_lm(checkpoint: str | Path) -> PreTrainedModel:
    """A causal LM (an LLM reranker's network), fp32 and eager attention as above."""
    tokenizer_file(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        str(checkpoint), attn_implementation="eager", local_files_only=True
    )
    return model.float()


def save_checkpoint(
    model: PreTrainedModel, tokenizer_source: Path, out: Path, provenance: dict[str, Any]
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    (out / TOKENIZER_FILE).write_bytes(tokenizer_source.read_bytes())
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def read_provenance(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def uses_token_types(model: torch.nn.Module) -> bool:
    return getattr(model.config, "type_vocab_size", 0) > 1 or model.config.model_type == "bert"
