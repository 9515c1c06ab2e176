from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from toy_data import MAX_LENGTH, MAX_QUERY_TOKENS, planted_groups
from transformers import AutoModelForSequenceClassification

from crossrank_train.checkpoints import checkpoint_dir, latest_checkpoint
from crossrank_train.evaluate import EvalSet
from crossrank_train.groups import read_groups, write_groups
from crossrank_train.models import read_provenance
from crossrank_train.train import TrainConfig, _check_resumable, train


@pytest.fixture
def config(trainable_checkpoint: Path, tmp_path: Path) -> TrainConfig:
    # 10 groups read 4 per pass: epochs end mid-step, so the data position is not a whole epoch.
    write_groups(tmp_path / "groups.jsonl", planted_groups(10, 3, seed=0))
    return TrainConfig(
        model=trainable_checkpoint,
        groups=tmp_path / "groups.jsonl",
        out=tmp_path / "full",
        loss="lce",
        negatives=3,
        batch_groups=2,
        accumulation=2,
        steps=6,
        lr=5e-3,
        warmup=0.3,
        save_every=3,
        max_query_tokens=MAX_QUERY_TOKENS,
        max_length=MAX_LENGTH,
    )


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForSequenceClassification.from_pretrained(str(model_dir)).state_dict()


def test_resume_continues_the_same_run(config: TrainConfig, tmp_path: Path) -> None:
    full = train(config)
    halfway = checkpoint_dir(config.out, 3)
    assert latest_checkpoint(config.out) == checkpoint_dir(config.out, 6)

    resumed = train(dataclasses.replace(config, out=tmp_path / "resumed", resume=halfway))

    assert resumed.state.step == full.state.step == 6
    assert resumed.state.seen == full.state.seen == 6 * 4
    # Dropout is on: equal losses need the RNG, the optimizer moments, the schedule and the data
    # position all restored.
    assert resumed.state.losses == full.state.losses
    assert len(set(full.state.losses)) == 6
    full_weights, resumed_weights = _weights(full.model), _weights(resumed.model)
    for name, tensor in full_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    assert resumed.report.is_file()


def test_resume_with_other_settings_is_refused(config: TrainConfig) -> None:
    train(dataclasses.replace(config, steps=3))
    changed = dataclasses.replace(config, steps=3, lr=1e-3, resume=checkpoint_dir(config.out, 3))
    with pytest.raises(ValueError, match="lr="):
        train(changed)


def test_a_setting_newer_than_the_checkpoint_counts_at_its_default(config: TrainConfig) -> None:
    saved = config.as_record()
    del saved["gate_lr"]  # a checkpoint from before --gate-lr
    _check_resumable(saved, config.as_record())
    with pytest.raises(ValueError, match="gate_lr="):
        _check_resumable(saved, dataclasses.replace(config, gate_lr=1e-2).as_record())


def _dev_of(queries: list[str]) -> EvalSet:
    ids = [f"d{i}" for i in range(len(queries))]
    return EvalSet(
        dict(zip(ids, queries, strict=True)),
        {"p": "a passage"},
        {qid: {"p": 1} for qid in ids},
        {qid: {"p": 1.0} for qid in ids},
        "first stage",
    )


def test_groups_of_dev_queries_are_left_out_of_training(config: TrainConfig) -> None:
    queries = [g.query for g in read_groups(config.groups, config.negatives)]
    short = dataclasses.replace(config, steps=1, save_every=0)

    model = train(short, _dev_of(queries[:3])).model

    assert read_provenance(model)["training_groups"] == sum(q not in queries[:3] for q in queries)
    with pytest.raises(ValueError, match="every training group's query is a dev query"):
        train(short, _dev_of(queries))


def test_resume_with_a_dev_set_that_leaves_out_other_groups_is_refused(
    config: TrainConfig,
) -> None:
    queries = [g.query for g in read_groups(config.groups, config.negatives)]
    train(dataclasses.replace(config, steps=3))
    resumed = dataclasses.replace(config, steps=3, resume=checkpoint_dir(config.out, 3))

    with pytest.raises(ValueError, match="training_groups="):
        train(resumed, _dev_of(queries[:2]))
