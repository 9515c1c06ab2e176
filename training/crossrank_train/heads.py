"""The one logit an exported graph returns per pair, and the torch reference it is checked on.

- A sequence classifier with one label: that label's logit.
- With two labels: ``logit[positive] - logit[other]``, whose sigmoid is exactly the softmax's
  probability of the positive label. Which one a client sees is a recorded choice
  (:class:`TwoLabelScore`): ``softmax`` serves that probability, ``difference`` the raw
  difference.
- A causal LM (an LLM reranker): ``logit(yes) - logit(no)`` for the token after each pair's last
  real token, wherever the padding is; its sigmoid is P(yes) over {yes, no}, the score
  Qwen3-Reranker's own recipe computes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from crossrank.model.model_dir import Activation
from crossrank_train.models import uses_token_types


class TwoLabelScore(StrEnum):
    SOFTMAX = "softmax"
    DIFFERENCE = "difference"


class _ClassifierLogit(torch.nn.Module):
    def __init__(self, head: ClassifierHead, model: torch.nn.Module) -> None:
        super().__init__()
        self.head = head
        self.model = model
        self.with_token_types = uses_token_types(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"attention_mask": attention_mask}
        if self.with_token_types:
            kwargs["token_type_ids"] = token_type_ids
        return self.head.reduce(self.model(input_ids=input_ids, **kwargs).logits)


class ClassifierHead:
    """A sequence classifier's logit: its only label's, or the positive minus the other."""

    def __init__(
        self, labels: int, two_label_score: TwoLabelScore | None = None, positive_label: int = 1
    ) -> None:
        if labels not in (1, 2):
            raise ValueError(f"the classifier has {labels} labels; crossrank serves 1 or 2")
        if labels == 2 and two_label_score is None:
            raise ValueError(
                "the classifier has two labels: say how they become a score, softmax (the "
                "positive label's probability) or difference (its logit minus the other's), "
                "as the model card says"
            )
        if labels == 1 and two_label_score is not None:
            raise ValueError(f"{two_label_score} applies to two labels; the classifier has one")
        if labels == 2 and positive_label not in (0, 1):
            raise ValueError(f"positive label {positive_label} is not 0 or 1")
        self.labels = labels
        self.two_label_score = two_label_score
        self.positive_label = positive_label

    @property
    def activation(self) -> Activation | None:
        """The activation the two-label choice implies (None: the caller's default)."""
        if self.two_label_score is None:
            return None
        if self.two_label_score is TwoLabelScore.SOFTMAX:
            return Activation.SIGMOID
        return Activation.IDENTITY

    def reduce(self, logits: torch.Tensor) -> torch.Tensor:
        if self.labels == 1:
            return logits[:, 0]
        return logits[:, self.positive_label] - logits[:, 1 - self.positive_label]

    def input_names(self, model: torch.nn.Module) -> list[str]:
        names = ["input_ids", "attention_mask"]
        return [*names, "token_type_ids"] if uses_token_types(model) else names

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return _ClassifierLogit(self, model).eval()

    def reference(self, model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            return self.reduce(model.eval()(**tensors).logits).float().numpy()

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": "classifier", "labels": self.labels}
        if self.labels == 2:
            record |= {"score": str(self.two_label_score), "positive_label": self.positive_label}
        return record


def single_token(tokenizer: Tokenizer, word: str) -> int:
    """The id of ``word`` as the tokenizer writes it alone; refused unless it is one token."""
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens for this tokenizer, not one: {ids}")
    return ids[0]


class _YesNoLogit(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, yes_id: int, no_id: int) -> None:
        super().__init__()
        self.decoder = model.get_decoder()
        weight = model.get_output_embeddings().weight.detach()
        # Two rows of the LM head instead of the whole vocabulary: the rest is never read.
        self.register_buffer("direction", (weight[yes_id] - weight[no_id]).clone())
        bias = model.get_output_embeddings().bias
        offset = 0.0 if bias is None else float(bias[yes_id] - bias[no_id])
        self.register_buffer("offset", torch.tensor(offset))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Positions count real tokens only, so a left-padded pair sees the same positions as a
        # right-padded one.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state
        # The last real token: the highest position whose mask is 1, wherever the padding is.
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask * steps).argmax(-1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return hidden[rows, last] @ self.direction + self.offset


class YesNoHead:
    """A causal LM's logit(yes) - logit(no) after the prompt."""

    activation = Activation.SIGMOID

    def __init__(self, tokenizer: Tokenizer, yes: str = "yes", no: str = "no") -> None:
        self.yes, self.no = yes, no
        self.yes_id = single_token(tokenizer, yes)
        self.no_id = single_token(tokenizer, no)
        if self.yes_id == self.no_id:
            raise ValueError(f"{yes!r} and {no!r} are the same token")

    def input_names(self, model: torch.nn.Module) -> list[str]:
        return ["input_ids", "attention_mask"]

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return _YesNoLogit(model, self.yes_id, self.no_id).eval()

    def reference(self, model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The whole LM as its users run it (every vocabulary logit, its own positions)."""
        mask = feeds["attention_mask"]
        with torch.inference_mode():
            logits = model.eval()(
                input_ids=torch.from_numpy(feeds["input_ids"]),
                attention_mask=torch.from_numpy(mask),
                use_cache=False,
            ).logits
        last = [int(np.flatnonzero(row)[-1]) for row in mask]
        picked = logits[torch.arange(len(last)), torch.tensor(last)].float().numpy()
        return picked[:, self.yes_id] - picked[:, self.no_id]

    def record(self) -> dict[str, Any]:
        return {
            "kind": "yes-no",
            "yes": {"word": self.yes, "id": self.yes_id},
            "no": {"word": self.no, "id": self.no_id},
        }


Head = ClassifierHead | YesNoHead
