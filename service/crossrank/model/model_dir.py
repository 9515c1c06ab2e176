"""The model directory: the one contract between the training package and the service.

A crossrank model directory holds:

- one or more ONNX files, the *variants* of the same network (``fp32``, ``int8``, ``fp16``, ...),
  each taking ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` when the network has
  segment embeddings), int64, shape ``[batch, sequence]``, and returning one fp32 logit per pair,
  shape ``[batch, 1]`` or ``[batch]``;
- ``tokenizer.json``, a Hugging Face ``tokenizers`` file: the checkpoint's own, whose pair
  template (``[CLS] query [SEP] passage [SEP]``, ``<s> query </s></s> passage </s>``, ...) builds
  the pairs, or, for an LLM reranker, the tokenizer its ``prompt`` is tokenised with (the service
  sets truncation and padding itself);
- ``crossrank.json``, the metadata below.

The training package writes it with :func:`write_metadata`; the service reads it with
:func:`load_model_dir`. Nothing else crosses between them.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

METADATA_FILE = "crossrank.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
INSTRUCTION_SLOT = "{instruction}"


def sigmoid(z: np.ndarray) -> np.ndarray:
    """float64; the tanh form cannot overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * z.astype(np.float64)))


class Activation(StrEnum):
    """How a logit becomes the `score` a client sees (unless it asks for raw scores)."""

    SIGMOID = "sigmoid"
    IDENTITY = "identity"


class PromptTemplate(BaseModel):
    """An LLM reranker's input text: ``prefix + query + separator + passage + suffix``.

    ``{instruction}`` in the prefix stands for the instruction: ``instruction`` unless a request
    brings its own. A prefix without the slot takes no instruction.
    """

    model_config = ConfigDict(extra="forbid")

    prefix: str = ""
    separator: str = Field(min_length=1)
    suffix: str = ""
    instruction: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PromptTemplate:
        if INSTRUCTION_SLOT in self.separator + self.suffix:
            raise ValueError(f"{INSTRUCTION_SLOT} may appear in the prefix only")
        slots = self.prefix.count(INSTRUCTION_SLOT)
        if slots > 1:
            raise ValueError(f"the prefix holds {INSTRUCTION_SLOT} {slots} times; once at most")
        if slots and self.instruction is None:
            raise ValueError(
                f"the prefix has an {INSTRUCTION_SLOT} slot but no default instruction"
            )
        if self.instruction is not None and not slots:
            raise ValueError(f"an instruction needs an {INSTRUCTION_SLOT} slot in the prefix")
        return self

    @property
    def takes_instruction(self) -> bool:
        return self.instruction is not None

    def head(self, query: str, instruction: str | None = None) -> str:
        """The text before the passage (a literal replace: a prefix may hold other braces)."""
        chosen = self.instruction if instruction is None else instruction
        return self.prefix.replace(INSTRUCTION_SLOT, chosen or "") + query + self.separator


class Calibration(BaseModel):
    """Platt scaling: P(relevant | logit) = sigmoid(slope * logit + intercept), fitted on a
    labelled set of (query, candidate) pairs. The slope is positive, so the map is strictly
    increasing: probabilities keep the logits' order and never tie where logits differ (an
    isotonic map would flatten ranges of logits into equal steps)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["platt"] = "platt"
    slope: float = Field(gt=0)
    intercept: float
    # The labelled set (its files and how candidates were drawn) and the variant scored on it.
    fitted_on: str = Field(min_length=1)
    variant: str = Field(min_length=1)
    pairs: int = Field(ge=2)
    positives: int = Field(ge=1)
    # Measurements of the fit (e.g. ECE on a held-out set), free-form.
    report: dict[str, Any] = Field(default_factory=dict)

    def probability(self, logits: np.ndarray) -> np.ndarray:
        """P(relevant) per logit, float64."""
        return sigmoid(self.slope * logits.astype(np.float64) + self.intercept)


class ModelMetadata(BaseModel):
    """Contents of ``crossrank.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1)
    max_query_tokens: int = Field(default=64, ge=1)
    max_length: int = Field(default=512, ge=8)
    activation: Activation = Activation.SIGMOID
    # variant name -> ONNX file name inside the directory.
    variants: dict[str, str] = Field(min_length=1)
    # Set for an LLM reranker: its pairs are this template's text, not the tokenizer's pairs.
    prompt: PromptTemplate | None = None
    # Calibrations by the variant whose logits each was fitted on: the `score` clients see is
    # the served variant's probability. `calibration` is a directory's single fit from before
    # there was one per variant (read, never written).
    calibrations: dict[str, Calibration] = Field(default_factory=dict)
    calibration: Calibration | None = None
    # Provenance (base model, data, metrics, git commit): free-form, for whoever reads the file.
    training: dict[str, Any] = Field(default_factory=dict)

    def calibration_for(self, variant: str) -> Calibration | None:
        """The fit for ``variant``'s logits; else another variant's (its ``variant`` says
        which), else None."""
        if variant in self.calibrations:
            return self.calibrations[variant]
        if self.calibration is not None:
            return self.calibration
        return next(iter(self.calibrations.values()), None)

    @model_validator(mode="after")
    def _check(self) -> ModelMetadata:
        for variant, fit in self.calibrations.items():
            if fit.variant != variant:
                raise ValueError(f"calibrations[{variant!r}] was fitted on {fit.variant!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported (expected {FORMAT_VERSION})"
            )
        if self.max_query_tokens + 3 >= self.max_length:
            raise ValueError("max_query_tokens must leave room for a passage within max_length")
        return self


class ModelDirError(Exception):
    """A model directory that cannot be served, with a message that says what to fix."""


class ModelDir:
    """A validated model directory."""

    def __init__(self, path: Path, metadata: ModelMetadata) -> None:
        self.path = path
        self.metadata = metadata

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def variant_path(self, variant: str) -> Path:
        try:
            return self.path / self.metadata.variants[variant]
        except KeyError:
            raise ModelDirError(
                f"model {self.path} has no variant {variant!r}; it has "
                f"{sorted(self.metadata.variants)}"
            ) from None

    def choose_variant(self, requested: str, device: str) -> str:
        """Resolve ``auto``: int8 on CPU, fp16 on CUDA, else fp32, else whatever exists."""
        if requested != "auto":
            self.variant_path(requested)
            return requested
        preferred = ["int8", "fp32"] if device == "cpu" else ["fp16", "fp32"]
        for name in preferred:
            if name in self.metadata.variants:
                return name
        return sorted(self.metadata.variants)[0]


def load_model_dir(path: str | Path) -> ModelDir:
    """Read and validate a model directory; raise :class:`ModelDirError` saying what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist")
    meta_file = root / METADATA_FILE
    if not meta_file.is_file():
        raise ModelDirError(
            f"{root} is not a crossrank model directory: {METADATA_FILE} is missing "
            "(create one with `crossrank export`)"
        )
    try:
        metadata = ModelMetadata.model_validate(json.loads(meta_file.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelDirError(f"{meta_file} is invalid: {exc}") from exc
    model = ModelDir(root, metadata)
    if not model.tokenizer_path.is_file():
        raise ModelDirError(f"{root} has no {TOKENIZER_FILE}")
    for variant, file in metadata.variants.items():
        if not (root / file).is_file():
            raise ModelDirError(f"{root}: variant {variant!r} names {file}, which does not exist")
    return model


def write_calibration(path: str | Path, calibration: Calibration) -> ModelDir:
    """Set ``calibration`` as its variant's in a model directory's ``crossrank.json``, leaving
    every other key as written (the ONNX files and the rest of the metadata are untouched); a
    single fit from before is kept as its own variant's."""
    meta_file = Path(path) / METADATA_FILE
    raw = json.loads(meta_file.read_text())
    fits = raw.setdefault("calibrations", {})
    legacy = raw.pop("calibration", None)
    if legacy is not None:
        fits.setdefault(legacy["variant"], legacy)
    fits[calibration.variant] = calibration.model_dump(mode="json")
    ModelMetadata.model_validate(raw)
    meta_file.write_text(json.dumps(raw, indent=2) + "\n")
    return load_model_dir(path)


def write_metadata(path: str | Path, metadata: ModelMetadata) -> Path:
    """Write ``crossrank.json`` into a model directory (used by the training package)."""
    out = Path(path) / METADATA_FILE
    out.write_text(json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")
    return out
