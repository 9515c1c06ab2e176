"""What export knows of each Hugging Face model family: the window a checkpoint allows, and the
name onnxruntime's transformer optimizer knows it by."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# onnxruntime.transformers' optimizer model type per Hugging Face model type, for the families
# whose graphs it is known (and tested here) to fuse: Attention for the BERT-shaped encoders,
# the RMS norms for Qwen3. Others get its generic fusions (layer norms, GELU) under "bert", and
# the export report says that they did.
OPTIMIZER_MODEL_TYPES = {
    "bert": "bert",
    "crossrank-gated-bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "qwen3": "qwen3",
}
GENERIC_OPTIMIZER = "bert"
# Families whose position ids start after the padding id (RoBERTa's embedding scheme), so
# max_position_embeddings counts padding_idx + 1 positions no token can use.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"}
# A tokenizer_config.json without a real limit says 1e30 (transformers' "very large integer").
NO_LIMIT = 10**9


def optimizer_model_type(model_type: str) -> tuple[str, bool]:
    """The optimizer's model type for a family, and whether it knows the family."""
    known = OPTIMIZER_MODEL_TYPES.get(model_type)
    return (known, True) if known else (GENERIC_OPTIMIZER, False)


def checkpoint_window(checkpoint: str | Path, config: Any) -> int | None:
    """The longest input the checkpoint takes: its position table's, capped by its tokenizer's
    ``model_max_length`` (None when it states neither)."""
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        if config.model_type in OFFSET_POSITIONS:
            positions -= config.pad_token_id + 1
        limits.append(positions)
    tokenizer_config = Path(checkpoint) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        stated = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(stated, int | float) and stated < NO_LIMIT:
            limits.append(int(stated))
    return min(limits) if limits else None
