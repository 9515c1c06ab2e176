from __future__ import annotations

from pathlib import Path

from crossrank_train.models import load_cross_encoder
from crossrank_train.train import TrainConfig, _optimizer


def test_head_learns_at_its_own_rate_and_only_matrices_decay(trainable_checkpoint: Path) -> None:
    model = load_cross_encoder(trainable_checkpoint)
    config = TrainConfig(
        model=trainable_checkpoint,
        groups=Path("unused.jsonl"),
        out=Path("unused"),
        lr=1e-5,
        head_lr=1e-3,
        weight_decay=0.1,
    )

    optimizer = _optimizer(model, config)

    by_id = {id(p): name for name, p in model.named_parameters()}
    settings = {
        by_id[id(p)]: (group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
        for p in group["params"]
    }
    assert len(settings) == len(by_id)  # every parameter is trained, once
    assert settings["classifier.weight"] == (1e-3, 0.1)
    assert settings["classifier.bias"] == (1e-3, 0.0)
    assert settings["bert.encoder.layer.0.attention.self.query.weight"] == (1e-5, 0.1)
    assert settings["bert.embeddings.LayerNorm.weight"] == (1e-5, 0.0)
