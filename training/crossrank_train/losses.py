"""Re-ranking losses over logits laid out as groups: ``[groups, 1 + k]``, the positive at index 0.

- ``bce``: pointwise binary cross-entropy, positive label 1, negatives 0, with ``pos_weight`` to
  balance the one positive against the k negatives of each group.
- ``lce``: localized contrastive estimation, softmax cross-entropy of each group with the
  positive as the target class (Gao et al., 2021).
- ``margin-mse``: distillation; the student's margins positive - negative_i regress onto the
  teacher's (Hofstätter et al., 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bce", "lce", "margin-mse")


def bce_loss(logits: torch.Tensor, pos_weight: float) -> torch.Tensor:
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(
        logits, labels, pos_weight=torch.tensor(pos_weight, dtype=logits.dtype)
    )


def lce_loss(logits: torch.Tensor) -> torch.Tensor:
    target = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, target)


def margin_mse_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    student_margins = logits[:, :1] - logits[:, 1:]
    teacher_margins = teacher[:, :1] - teacher[:, 1:]
    return F.mse_loss(student_margins, teacher_margins.to(logits.dtype))


def group_loss(
    name: str, logits: torch.Tensor, teacher: torch.Tensor | None, pos_weight: float
) -> torch.Tensor:
    """The loss ``name`` of group-shaped logits (fp32, whatever precision produced them)."""
    logits = logits.float()
    if name == "bce":
        return bce_loss(logits, pos_weight)
    if name == "lce":
        return lce_loss(logits)
    if name == "margin-mse":
        if teacher is None:
            raise ValueError("margin-mse needs teacher scores (mine with --teacher)")
        return margin_mse_loss(logits, teacher)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
