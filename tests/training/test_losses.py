from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from toy_data import MAX_LENGTH, MAX_QUERY_TOKENS, planted_groups

from crossrank.model.tokenization import PairTokenizer
from crossrank_train.groups import Group, write_groups
from crossrank_train.losses import bce_loss, group_loss, lce_loss, margin_mse_loss
from crossrank_train.models import load_cross_encoder, tokenizer_file
from crossrank_train.scoring import TorchScorer
from crossrank_train.train import TrainConfig, train

LOGITS = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]]
NEGATIVES = 3  # per group in the toy training runs


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
    write_groups(tmp_path / "groups.jsonl", planted_groups(64, NEGATIVES, seed=0))
    config = _toy_config(trainable_checkpoint, tmp_path, "run", loss=loss, steps=40, lr=1e-2)
    result = train(config)

    losses = result.state.losses
    assert len(losses) == 40
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    scorer = _scorer(result.model)
    unseen = planted_groups(20, NEGATIVES, seed=1)
    ranks_first = [int(scorer.score(g.query, g.passages).argmax()) == 0 for g in unseen]
    assert all(ranks_first)


def test_lce_with_distillation_adds_the_weighted_hand_computed_margin_mse() -> None:
    teacher = [[3.0, 1.0, 0.0], [2.0, 2.0, 0.0]]
    lce = 0.0
    for row in LOGITS:
        lce -= math.log(math.exp(row[0]) / sum(math.exp(x) for x in row))
    lce /= len(LOGITS)
    margin_mse = (0.5**2 + 0.0**2 + 1.0**2 + 2.0**2) / 4  # as in the test above
    loss = group_loss("lce", torch.tensor(LOGITS), torch.tensor(teacher), 1.0, distill_weight=0.5)
    assert loss.item() == pytest.approx(lce + 0.5 * margin_mse, rel=1e-6)


def test_distillation_beside_a_labelled_loss_needs_teacher_scores() -> None:
    with pytest.raises(ValueError, match="teacher"):
        group_loss("lce", torch.tensor(LOGITS), None, 1.0, distill_weight=0.5)


@pytest.mark.parametrize(("loss", "weight"), [("margin-mse", 1.0), ("lce", -1.0)])
def test_a_distill_weight_is_refused_where_it_means_nothing(
    loss: str, weight: float, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="distill_weight"):
        TrainConfig(model=tmp_path, groups=tmp_path, out=tmp_path, loss=loss, distill_weight=weight)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_a_dropout_outside_0_1_is_refused(dropout: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(model=tmp_path, groups=tmp_path, out=tmp_path, dropout=dropout)


def test_training_with_distillation_refuses_groups_without_teacher_scores(
    trainable_checkpoint: Path, tmp_path: Path
) -> None:
    plain = [Group(g.query, g.positive, g.negatives) for g in planted_groups(8, NEGATIVES, seed=0)]
    write_groups(tmp_path / "groups.jsonl", plain)
    config = _toy_config(trainable_checkpoint, tmp_path, "run", distill_weight=1.0, steps=1)
    with pytest.raises(ValueError, match="crossrank teach"):
        train(config)


def test_distillation_from_the_start_holds_the_margins_near_it(
    trainable_checkpoint: Path, tmp_path: Path
) -> None:
    """With the model's own start as the teacher, the term pulls back as LCE moves the scores: a
    heavy weight keeps the trained margins nearer the start's than LCE alone does."""
    groups = _self_taught_groups(trainable_checkpoint, 32, tmp_path / "groups.jsonl")

    def margin_drift(weight: float) -> float:
        config = _toy_config(
            trainable_checkpoint,
            tmp_path,
            f"run-{weight}",
            distill_weight=weight,
            steps=20,
            lr=1e-2,
        )
        tuned = _scorer(train(config).model)
        drift = 0.0
        for g in groups:
            now, then = tuned.score(g.query, g.passages), np.array(g.teacher_scores)
            drift += float((((now[0] - now[1:]) - (then[0] - then[1:])) ** 2).sum())
        return drift

    assert margin_drift(10.0) < 0.5 * margin_drift(0.0)


def test_without_dropout_a_self_teacher_adds_nothing_at_step_0(
    trainable_checkpoint: Path, tmp_path: Path
) -> None:
    """The first step's loss is computed before any update: with dropout off the student is its
    teacher, so LCE + MarginMSE equals LCE alone there; with dropout on it does not."""
    _self_taught_groups(trainable_checkpoint, 8, tmp_path / "groups.jsonl")

    def first_loss(weight: float, dropout: float) -> float:
        name = f"run-{weight}-{dropout}"
        config = _toy_config(
            trainable_checkpoint, tmp_path, name, distill_weight=weight, dropout=dropout, steps=1
        )
        return train(config).state.losses[0]

    assert first_loss(100.0, 0.0) == pytest.approx(first_loss(0.0, 0.0), rel=1e-5)
    assert first_loss(100.0, 0.5) > 1.01 * first_loss(0.0, 0.5)


def _toy_config(checkpoint: Path, tmp_path: Path, run: str, **settings: Any) -> TrainConfig:
    """Training on ``tmp_path/groups.jsonl`` (NEGATIVES a group, 8 groups a step) into
    ``tmp_path/run``; ``settings`` name the rest."""
    return TrainConfig(
        model=checkpoint,
        groups=tmp_path / "groups.jsonl",
        out=tmp_path / run,
        **{"negatives": NEGATIVES, "batch_groups": 8, "warmup": 0.0, **settings},
        max_query_tokens=MAX_QUERY_TOKENS,
        max_length=MAX_LENGTH,
    )


def _self_taught_groups(checkpoint: Path, count: int, path: Path) -> list[Group]:
    """Planted groups scored by ``checkpoint`` itself as the teacher, written to ``path``."""
    start = _scorer(checkpoint)
    groups = [
        Group(g.query, g.positive, g.negatives, start.score(g.query, g.passages).tolist())
        for g in planted_groups(count, NEGATIVES, seed=0)
    ]
    write_groups(path, groups)
    return groups


def _scorer(checkpoint: Path) -> TorchScorer:
    tokenizer = PairTokenizer(tokenizer_file(checkpoint), MAX_QUERY_TOKENS, MAX_LENGTH)
    return TorchScorer(load_cross_encoder(checkpoint), tokenizer)
