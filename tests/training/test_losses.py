from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from toy_data import MAX_LENGTH, MAX_QUERY_TOKENS, planted_groups

from crossrank.tokenization import PairTokenizer
from crossrank_train.groups import write_groups
from crossrank_train.losses import bce_loss, group_loss, lce_loss, margin_mse_loss
from crossrank_train.models import load_cross_encoder, tokenizer_file
from crossrank_train.scoring import TorchScorer
from crossrank_train.train import TrainConfig, train

LOGITS = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_lce_matches_hand_computed_softmax_cross_entropy() -> None:
    expected = 0.0
    for row in LOGITS:
        expected -= math.log(math.exp(row[0]) / sum(math.exp(x) for x in row))
    expected /= len(LOGITS)
    assert lce_loss(torch.tensor(LOGITS)).item() == pytest.approx(expected, rel=1e-6)


def test_bce_matches_hand_computed_weighted_binary_cross_entropy() -> None:
    pos_weight = 2.0
    terms = []
    for row in LOGITS:
        terms.append(-pos_weight * math.log(_sigmoid(row[0])))
        terms.extend(-math.log(1.0 - _sigmoid(x)) for x in row[1:])
    expected = sum(terms) / len(terms)
    assert bce_loss(torch.tensor(LOGITS), pos_weight).item() == pytest.approx(expected, rel=1e-6)


def test_margin_mse_matches_hand_computed_margins() -> None:
    teacher = [[3.0, 1.0, 0.0], [2.0, 2.0, 0.0]]
    # Student margins [1.5, 3.0], [-1.0, 0.0]; teacher margins [2.0, 3.0], [0.0, 2.0].
    expected = (0.5**2 + 0.0**2 + 1.0**2 + 2.0**2) / 4
    loss = margin_mse_loss(torch.tensor(LOGITS), torch.tensor(teacher))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_margin_mse_without_teacher_scores_is_refused() -> None:
    with pytest.raises(ValueError, match="teacher"):
        group_loss("margin-mse", torch.tensor(LOGITS), None, 1.0)


@pytest.mark.parametrize("loss", ["bce", "lce", "margin-mse"])
def test_loss_decreases_and_ranks_the_planted_positive_first(
    loss: str, trainable_checkpoint: Path, tmp_path: Path
) -> None:
    negatives = 3
    write_groups(tmp_path / "groups.jsonl", planted_groups(64, negatives, seed=0))
    config = TrainConfig(
        model=trainable_checkpoint,
        groups=tmp_path / "groups.jsonl",
        out=tmp_path / "run",
        loss=loss,
        negatives=negatives,
        batch_groups=8,
        steps=40,
        lr=1e-2,
        warmup=0.0,
        max_query_tokens=MAX_QUERY_TOKENS,
        max_length=MAX_LENGTH,
    )
    result = train(config)

    losses = result.state.losses
    assert len(losses) == 40
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    trained = load_cross_encoder(result.model)
    tokenizer = PairTokenizer(tokenizer_file(result.model), MAX_QUERY_TOKENS, MAX_LENGTH)
    scorer = TorchScorer(trained, tokenizer)
    unseen = planted_groups(20, negatives, seed=1)
    ranks_first = [int(scorer.score(g.query, g.passages).argmax()) == 0 for g in unseen]
    assert all(ranks_first)
