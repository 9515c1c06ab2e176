"""Service settings: CLI flags, else ``CROSSRANK_*`` environment variables, else these defaults;
and the models served, each with its own values of the engine and batching settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Settings a model may set for itself (in models_file); the rest are the server's.
PER_MODEL = (
    "variant",
    "device",
    "threads",
    "cuda_device_id",
    "cuda_mem_limit_mb",
    "max_batch_tokens",
    "max_batch_pairs",
    "max_wait_ms",
    "max_queued_pairs",
    "max_batch_queued_pairs",
    "score_cache_bytes",
)


class ModelSpec(BaseModel):
    """One model to serve: its directory, the names a request may call it by, and its own
    values of the engine and batching settings (None: the server's)."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    name: str | None = Field(default=None, min_length=1, description="None: crossrank.json's")
    aliases: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    default: bool = Field(default=False, description="Serves requests that name no model.")
    variant: str | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    threads: int | None = Field(default=None, ge=0)
    cuda_device_id: int | None = Field(default=None, ge=0)
    cuda_mem_limit_mb: int | None = Field(default=None, ge=0)
    max_batch_tokens: int | None = Field(default=None, ge=0)
    max_batch_pairs: int | None = Field(default=None, ge=1)
    max_wait_ms: float | None = Field(default=None, ge=0)
    max_queued_pairs: int | None = Field(default=None, ge=1)
    max_batch_queued_pairs: int | None = Field(default=None, ge=1)
    score_cache_bytes: int | None = Field(default=None, ge=0)

    @classmethod
    def parse(cls, entry: str) -> ModelSpec:
        """``PATH`` or ``NAME=PATH``."""
        name, _, path = entry.rpartition("=")
        return cls(path=Path(path), name=name or None)

    def overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PER_MODEL if getattr(self, k) is not None}


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CROSSRANK_", extra="ignore", populate_by_name=True
    )

    model: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("CROSSRANK_MODEL", "CROSSRANK_MODELS"),
        description="A model directory to serve, as PATH or NAME=PATH (a bare PATH is named by "
        "its crossrank.json); repeat the flag, or separate them with commas in CROSSRANK_MODEL "
        "or CROSSRANK_MODELS.",
    )
    models_file: Path | None = Field(
        default=None,
        description="A YAML file of models (path, name, aliases, default, and their own "
        "variant, device, threads, batch and queue bounds), served beside any --model.",
    )
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)

    # Engine.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    variant: str = Field(default="auto", description="ONNX variant: auto, fp32, int8, fp16, ...")
    threads: int = Field(default=0, ge=0, description="Intra-op threads on CPU; 0 = all cores.")
    engine_sharing: Literal["concurrent", "turns"] = Field(
        default="concurrent",
        description="With several models: their engines run at once, each with every core "
        "(concurrent, measured faster on CPU: docs/models-served.md), or take turns, one batch "
        "at a time (turns: a hung engine then holds the others back too).",
    )
    engine_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Added to the niceness of the threads that tokenise and score (Linux): on "
        "saturated cores the event loop (admission, refusals, probes) runs ahead of that work; "
        "0 = no change.",
    )
    cuda_device_id: int = Field(default=0, ge=0)
    cuda_mem_limit_mb: int = Field(
        default=0, ge=0, description="Cap on the CUDA arena in MiB; 0 = no cap."
    )

    # Request limits.
    max_passages: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A connection whose request line and headers take longer is closed.",
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="A longer request line and headers get a 400."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="A request whose body takes longer to arrive gets a 408."
    )
    default_timeout_ms: int = Field(
        default=60_000, ge=1, description="Deadline of a request that sends no timeout_ms."
    )
    default_budget_ms: int = Field(
        default=0,
        ge=0,
        description="Latency budget of a request that sends no budget_ms (and does not chunk): "
        "by then it is answered with what was scored (200, partial); never past its timeout_ms; "
        "0 = none.",
    )

    score_cache_bytes: int = Field(
        default=0,
        ge=0,
        description="Bound of the in-process LRU cache of pair logits, in bytes; 0 = no cache.",
    )

    # Long passages (per request too).
    long_passages: Literal["truncate", "chunk"] = Field(
        default="truncate",
        description="A pair over max_length: cut the passage (truncate), or score overlapping "
        "windows of it and aggregate (chunk).",
    )
    chunk_stride: int = Field(
        default=32, ge=0, description="Passage tokens shared by consecutive windows (chunk)."
    )
    chunk_aggregation: Literal["max", "first", "mean"] = Field(
        default="max", description="A chunked passage's score from its windows' logits."
    )
    max_chunks_per_doc: int = Field(
        default=8, ge=1, description="Windows scored per passage at most (chunk), from its start."
    )

    # Batching (crossrank.core.queue, crossrank.core.scheduling).
    max_batch_tokens: int = Field(
        default=0,
        ge=0,
        description="Padded tokens per batch; 0 = auto: 1024 on CPU, 16384 on CUDA.",
    )
    max_batch_pairs: int = Field(default=128, ge=1)
    max_wait_ms: float = Field(default=2.0, ge=0)
    max_queued_pairs: int = Field(
        default=4000,
        ge=1,
        description="Room for pairs being tokenised, queued or scored; a request that would "
        "overflow it is refused (503) before any work.",
    )
    max_batch_queued_pairs: int = Field(
        default=4000, ge=1, description="Room for batch-priority pairs, apart from the above."
    )
    batch_aging_s: float = Field(
        default=30.0,
        gt=0,
        description="Batch-priority work runs on idle capacity; once queued this long it also "
        "gets one batch after each interactive request, so it cannot starve.",
    )
    length_sorting: bool = Field(
        default=True, description="Sort each request's pairs by length before batching."
    )
    aging_s: float = Field(
        default=2.0,
        gt=0,
        description="A request's remaining work counts 1/(1 + age/aging_s): old ones can't starve.",
    )
    retry_after_s: int = Field(
        default=1,
        ge=1,
        description="Retry-After of a 503 whose wait is not measured (not ready, draining, "
        "stalled, no batch scored yet); a full queue's is its expected drain time.",
    )
    retry_after_max_s: int = Field(
        default=30, ge=1, description="The most a full queue's Retry-After says."
    )

    # Drain (SIGTERM).
    drain_delay_s: float = Field(
        default=5.0,
        ge=0,
        description="After SIGTERM, keep the listener open this long, answering new requests "
        "503 shutting_down (Kubernetes routes to a terminating pod for a few seconds).",
    )
    drain_grace_s: float = Field(
        default=60.0,
        gt=0,
        description="After SIGTERM, exit within this long (the delay included), answered or "
        "not; keep it under the pod's terminationGracePeriodSeconds.",
    )

    # Watchdog (a hung engine).
    watchdog_multiple: float = Field(
        default=20.0,
        gt=1,
        description="A batch is stalled after this many times its expected time: /ready 503, "
        "queued requests 503.",
    )
    watchdog_floor_s: float = Field(
        default=10.0, gt=0, description="A batch is never stalled before this many seconds."
    )
    watchdog_liveness_s: float = Field(
        default=120.0,
        gt=0,
        description="/health fails once a batch has run this long (Kubernetes restarts the pod).",
    )

    # Logs.
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json: one JSON object per line."
    )
    access_log: bool = Field(
        default=True, description="One line per request: id, route, status, sizes, timings."
    )
    otlp_endpoint: str = Field(default="", description="OTLP/HTTP base URL for traces (off).")
    # Tests only (crossrank.model.fault): batches hang while it exists; {port} = this port.
    test_stall_file: str = ""

    # Access.
    api_keys: str = Field(
        default="",
        repr=False,
        description="Comma-separated API keys; when any is set (here or in api_keys_file), "
        "requests need 'Authorization: Bearer KEY'.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file of API keys, one per line (e.g. a mounted secret)."
    )
    invalid_per_s: float = Field(
        default=2.0,
        ge=0,
        description="With API keys: each key's invalid requests (4xx) refill at this rate; a "
        "key that spends invalid_burst of them is refused (429) from its headers until one "
        "refills. 0: no limit.",
    )
    invalid_burst: int = Field(default=20, ge=1, description="See invalid_per_s.")
    metrics_require_key: bool = Field(
        default=False, description="Ask for a key on /metrics too (it is open by default)."
    )

    @field_validator("model", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> Any:
        if isinstance(value, str | Path):
            value = [value]
        if isinstance(value, list):
            return [e.strip() for v in value for e in str(v).split(",") if e.strip()]
        return value

    def model_specs(self) -> list[ModelSpec]:
        """The models to serve, in order: --model's, then models_file's. Raises ValueError
        naming what is wrong with the file."""
        specs = [ModelSpec.parse(entry) for entry in self.model]
        if self.models_file is not None:
            try:
                raw = yaml.safe_load(self.models_file.read_text())
                specs += ModelsFile.model_validate(raw).models
            except (OSError, yaml.YAMLError, ValueError) as exc:
                raise ValueError(f"models_file {self.models_file}: {exc}") from None
        return specs

    def for_model(self, spec: ModelSpec) -> Settings:
        """These settings with the model's own values in place of the server's."""
        return self.model_copy(update=spec.overrides())

    def load_api_keys(self) -> frozenset[str]:
        """The keys of ``api_keys`` and ``api_keys_file``; empty = no authentication. Read once at
        start-up: a rotated key file takes effect on restart."""
        keys = [k.strip() for k in self.api_keys.split(",")]
        if self.api_keys_file is not None:
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines()]
        return frozenset(k for k in keys if k)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        check_consistent(self)
        return self


def check_consistent(settings: Settings) -> None:
    """Settings that contradict one another, each refused with the reason (ValueError)."""
    # Both names are read for the models (CROSSRANK_MODELS reads better with several); given
    # both, pydantic-settings would keep one and drop the other's models without a word.
    if os.environ.get("CROSSRANK_MODEL") and os.environ.get("CROSSRANK_MODELS"):
        raise ValueError(
            "CROSSRANK_MODEL and CROSSRANK_MODELS are both set: set one (a comma-separated "
            "list of [NAME=]PATH)"
        )
    if settings.api_keys_file is not None and not settings.api_keys_file.is_file():
        raise ValueError(f"api_keys_file {settings.api_keys_file} is not a readable file")
    if settings.drain_grace_s <= settings.drain_delay_s:
        raise ValueError(
            f"drain_grace_s ({settings.drain_grace_s}) must exceed drain_delay_s "
            f"({settings.drain_delay_s}): admitted requests need time to finish after it"
        )
    if settings.watchdog_liveness_s <= settings.watchdog_floor_s:
        raise ValueError(
            f"watchdog_liveness_s ({settings.watchdog_liveness_s}) must exceed watchdog_floor_s "
            f"({settings.watchdog_floor_s}): /health fails only after /ready has"
        )
    for bound in ("max_queued_pairs", "max_batch_queued_pairs"):
        if settings.max_passages > getattr(settings, bound):
            raise ValueError(
                f"max_passages ({settings.max_passages}) must not exceed {bound} "
                f"({getattr(settings, bound)}): such a request could never be admitted"
            )
