from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import build_model, build_tokenizer
from toy_data import GRADED_LEVELS, MAX_LENGTH, MAX_QUERY_TOKENS, graded_groups
from transformers import BertForSequenceClassification

from crossrank.model.model_dir import TOKENIZER_FILE
from crossrank_train.groups import write_groups
from crossrank_train.train import TrainConfig, train


def save_tiny_checkpoint(out: Path, model: BertForSequenceClassification) -> Path:
    model.save_pretrained(str(out))
    build_tokenizer().save(str(out / TOKENIZER_FILE))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service tests' tiny BERT (its head scaled up, so scores are far apart) on disk."""
    model = build_model(build_tokenizer().get_vocab_size(), MAX_LENGTH)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), model)


@pytest.fixture(scope="session")
def trainable_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with a freshly initialised head (small logits): where training tests start."""
    model = build_model(build_tokenizer().get_vocab_size(), MAX_LENGTH)
    with torch.no_grad():
        model.classifier.reset_parameters()
    return save_tiny_checkpoint(tmp_path_factory.mktemp("trainable-checkpoint"), model)


@pytest.fixture(scope="session")
def graded_checkpoint(trainable_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT distilled (MarginMSE) to score passages by how often they say the marker:
    a model with a definite ranking for reduced-precision variants to keep."""
    root = tmp_path_factory.mktemp("graded")
    write_groups(root / "groups.jsonl", graded_groups(64, 3, seed=0, levels=GRADED_LEVELS))
    config = TrainConfig(
        model=trainable_checkpoint,
        groups=root / "groups.jsonl",
        out=root / "run",
        loss="margin-mse",
        negatives=3,
        batch_groups=8,
        steps=40,
        lr=1e-2,
        warmup=0.0,
        max_query_tokens=MAX_QUERY_TOKENS,
        max_length=MAX_LENGTH,
    )
    return train(config).model
