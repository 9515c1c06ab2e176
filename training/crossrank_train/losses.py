"""Re-ranking losses over logits laid out as groups: ``[groups, 1 + k]``, the positive at index 0.

- ``bce``: pointwise binary cross-entropy, positive label 1, negatives 0, with ``pos_weight`` to
  balance the one positive against the k negatives of each group.
- ``lce``: localized contrastive estimation, softmax cross-entropy of each group with the
  positive as the target class (Gao et al., 2021).
- ``margin-mse``: distillation; the student's margins positive - negative_i regress onto the
  teacher's (Hofstätter et al., 2020).

``bce`` and ``lce`` take a MarginMSE term beside them with ``distill_weight`` > 0: the labels
teach while the teacher's margins hold on to what it knows (the teacher may be the model's own
start: the term is then 0 at step 0 but for dropout and bf16 rounding, and grows as training
moves away from it).
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


def needs_teacher(name: str, distill_weight: float) -> bool:
    return name == "margin-mse" or distill_weight > 0


def group_loss(
    name: str,
    logits: torch.Tensor,
    teacher: torch.Tensor | None,
    pos_weight: float,
    distill_weight: float = 0.0,
) -> torch.Tensor:
    """The loss ``name`` of group-shaped logits (fp32, whatever precision produced them), plus
    ``distill_weight`` times MarginMSE against ``teacher`` for ``bce`` and ``lce``."""
    logits = logits.float()
    if needs_teacher(name, distill_weight) and teacher is None:
        raise ValueError(f"{name} with distillation needs teacher scores (crossrank teach)")
    if name == "margin-mse":
        if distill_weight:
            raise ValueError("distill_weight adds MarginMSE to bce or lce, not to margin-mse")
        return margin_mse_loss(logits, teacher)
    if name == "bce":
        labelled = bce_loss(logits, pos_weight)
    elif name == "lce":
        labelled = lce_loss(logits)
    else:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
    if distill_weight:
        return labelled + distill_weight * margin_mse_loss(logits, teacher)
    return labelled
