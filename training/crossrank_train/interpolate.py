"""Weight-space ensembling: a checkpoint between a start and a model fine-tuned from it.

WiSE-FT (Wortsman et al. 2022): ``(1 - alpha) * start + alpha * tuned``, parameter by parameter.
Fine-tuning can gain on the training distribution while losing the start's robustness elsewhere;
interpolating the weights often keeps much of the gain and the robustness, at no serving cost (the
result is one network of the same shape). It only makes sense when ``tuned`` was trained from
``start``, so the two must share architecture, configuration, tokenizer and buffers (the gated
model's IDF table): what training never changes must be identical, or the pair is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crossrank_train.models import (
    CheckpointError,
    load_cross_encoder,
    read_provenance,
    save_checkpoint,
    tokenizer_file,
)
from crossrank_train.provenance import git_commit

# The provenance keys crossrank export reads (crossrank_train.export.export_checkpoint).
_EXPORT_READS = ("loss", "max_query_tokens", "max_length", "activation")
# Written by save_pretrained but not part of what the network computes.
_CONFIG_BOOKKEEPING = {"_name_or_path", "torch_dtype", "dtype", "transformers_version"}


def _config(model: torch.nn.Module) -> dict[str, Any]:
    return {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_BOOKKEEPING}


def interpolate_checkpoints(start: Path, tuned: Path, alpha: float, out: Path) -> Path:
    """Write ``(1 - alpha) * start + alpha * tuned`` to ``out`` (a checkpoint dir train, eval
    and export take). ``alpha`` 0 gives ``start``'s weights, 1 ``tuned``'s."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], not {alpha}")
    if tokenizer_file(start).read_bytes() != tokenizer_file(tuned).read_bytes():
        raise CheckpointError(f"{start} and {tuned} tokenize differently: not one model's weights")
    first, second = load_cross_encoder(start), load_cross_encoder(tuned)
    ours, theirs = _config(first), _config(second)
    if ours != theirs:
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise CheckpointError(f"{start} and {tuned} differ in their configuration: {changed}")
    buffers = dict(second.named_buffers())
    for name, buffer in first.named_buffers():
        if name not in buffers or not torch.equal(buffer, buffers[name]):
            raise CheckpointError(
                f"buffer {name} differs between {start} and {tuned}: training never changes "
                "buffers, so these are not a start and a model fine-tuned from it"
            )
    tuned_params = dict(second.named_parameters())
    with torch.no_grad():
        for name, param in first.named_parameters():
            param.lerp_(tuned_params[name], alpha)
    start_provenance, tuned_provenance = read_provenance(start), read_provenance(tuned)
    provenance = {
        "base_model": start_provenance.get("base_model", str(start)),
        # What export reads (loss, lengths, activation): the tuned model's, else the start's.
        **{
            key: value
            for key in _EXPORT_READS
            if (value := tuned_provenance.get(key, start_provenance.get(key))) is not None
        },
        "interpolation": {
            "method": "WiSE-FT: (1 - alpha) * start + alpha * tuned",
            "alpha": alpha,
            "start": str(start),
            "tuned": str(tuned),
            "start_provenance": start_provenance,
            "tuned_provenance": tuned_provenance,
        },
        "git_commit": git_commit(),
    }
    return save_checkpoint(first, tokenizer_file(start), out, provenance)
