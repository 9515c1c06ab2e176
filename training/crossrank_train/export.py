"""Export a Hugging Face sequence classifier (one output) into a crossrank model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

from crossrank.model_dir import (
    TOKENIZER_FILE,
    ModelDir,
    ModelMetadata,
    load_model_dir,
    write_metadata,
)

OPSET = 17
FP32_FILE = "model.onnx"


class ParityError(RuntimeError):
    """An exported graph disagrees with the torch model beyond the allowed tolerance."""


class _LogitOnly(torch.nn.Module):
    """The classifier with plain tensor inputs and one [batch] logit output."""

    def __init__(self, model: torch.nn.Module, with_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.with_token_types = with_token_types

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"attention_mask": attention_mask}
        if self.with_token_types:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(input_ids=input_ids, **kwargs).logits[:, 0]


def has_token_types(model: torch.nn.Module) -> bool:
    return getattr(model.config, "type_vocab_size", 0) > 1 or model.config.model_type == "bert"


def export_onnx(model: torch.nn.Module, out_file: Path, sample_length: int = 16) -> list[str]:
    """Write ``model`` as ONNX (opset 17, dynamic batch and sequence); returns its input names."""
    model = model.eval()
    with_types = has_token_types(model)
    wrapper = _LogitOnly(model, with_types)
    batch, length = 2, sample_length
    ids = torch.ones((batch, length), dtype=torch.long)
    mask = torch.ones((batch, length), dtype=torch.long)
    names = ["input_ids", "attention_mask"]
    args: tuple[torch.Tensor, ...] = (ids, mask)
    if with_types:
        names.append("token_type_ids")
        args = (ids, mask, torch.zeros((batch, length), dtype=torch.long))
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["logits"] = {0: "batch"}
    # The TorchScript exporter: its graphs are the ones onnxruntime's transformer optimizer fuses.
    torch.onnx.export(
        wrapper,
        args,
        str(out_file),
        input_names=names,
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=OPSET,
        dynamo=False,
    )
    return names


def torch_logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        return model.eval()(**tensors).logits[:, 0].float().numpy()


def onnx_logits(model_file: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0].reshape(-1)


def check_parity(
    model: torch.nn.Module, model_file: Path, feeds: dict[str, np.ndarray], tolerance: float
) -> float:
    """Max |logit difference| between torch and the ONNX file; raises ParityError over tolerance."""
    delta = float(np.max(np.abs(torch_logits(model, feeds) - onnx_logits(model_file, feeds))))
    if not delta <= tolerance:
        raise ParityError(f"{model_file.name}: max |Δlogit| {delta:.3g} > {tolerance:g}")
    return delta


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Save without truncation/padding: the service sets both from the metadata."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.save(str(out_dir / TOKENIZER_FILE))


def export_model_dir(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    name: str,
    max_query_tokens: int = 64,
    max_length: int = 512,
    training: dict[str, Any] | None = None,
    parity_feeds: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
) -> ModelDir:
    """fp32 ONNX + tokenizer + metadata; with ``parity_feeds``, the fp32 parity gate too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / FP32_FILE)
    if parity_feeds is not None:
        check_parity(model, out / FP32_FILE, parity_feeds, tolerance)
    write_tokenizer(tokenizer, out)
    write_metadata(
        out,
        ModelMetadata(
            name=name,
            max_query_tokens=max_query_tokens,
            max_length=max_length,
            variants={"fp32": FP32_FILE},
            training=training or {},
        ),
    )
    return load_model_dir(out)
