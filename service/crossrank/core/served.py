"""One model served, and its parts' life: load, warm up, serve, drain.

Built at start from the model's settings (the server's, with the model's own values in place):
a worker on its engine (crossrank.core.worker), the queue that batches for it
(crossrank.core.queue), admission bounding what they hold (crossrank.core.admission), and the
pipeline that scores a request through them (crossrank.core.pipeline). Each model has its own
of each; crossrank.core.service holds them all.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from crossrank.core.admission import Admission
from crossrank.core.errors import ErrorType, ServiceError
from crossrank.core.pipeline import Pipeline
from crossrank.core.queue import PairQueue
from crossrank.core.ranking import ScoreScale
from crossrank.core.scheduling import AUTO_BATCH_TOKENS, BatchLimits
from crossrank.core.watchdog import WatchdogLimits
from crossrank.core.worker import Worker
from crossrank.features.chunking import Aggregation, LongPassages
from crossrank.features.score_cache import ScoreCache
from crossrank.model.collate import PaddedBatch, pad_pairs
from crossrank.model.engine import Engine, SessionPlan, plan_session
from crossrank.model.model_dir import Activation, ModelDir
from crossrank.model.tokenization import (
    EncodedPair,
    PairTokenizer,
    PromptTokenizer,
    WindowTokenizer,
    load_pair_encoder,
)
from crossrank.model.variant_choice import Choice, EngineFactory, load_variant, read_cpu_flags
from crossrank.ops.metrics import ModelMetrics
from crossrank.ops.priority import build_on_lowered_thread
from crossrank.ops.settings import Settings

log = logging.getLogger(__name__)


def warmup_batches(
    probe: EncodedPair, max_length: int, max_batch_tokens: int, max_batch_pairs: int
) -> list[PaddedBatch]:
    """One full batch per power-of-two length bucket up to max_length, so every kernel shape
    class and the largest buffers are met before the first user request."""
    lengths = []
    length = 16
    while length < max_length:
        lengths.append(length)
        length *= 2
    lengths.append(max_length)
    batches = []
    for length in lengths:
        pairs = max(1, min(max_batch_pairs, max_batch_tokens // length))
        ids = np.resize(probe.input_ids, length)
        types = np.resize(probe.token_type_ids, length)
        batches.append(pad_pairs([EncodedPair(ids, types)] * pairs))
    return batches


def model_admission(
    settings: Settings,
    metrics: ModelMetrics,
    stalled: Callable[[], bool],
    drain_seconds: Callable[[int], float | None],
) -> Admission:
    """A model's admission: its bounds, and a fair share per key when several keys are set."""
    return Admission(
        settings.max_queued_pairs,
        metrics,
        stalled,
        drain_seconds,
        max_batch_pairs=settings.max_batch_queued_pairs,
        fair_keys=len(settings.load_api_keys()) > 1,
    )


@dataclass(frozen=True)
class CatalogEntry:
    """A model as configured: the names it answers to, its directory and its settings."""

    name: str
    aliases: tuple[str, ...]
    default: bool
    model: ModelDir
    settings: Settings


class ServedModel:
    def __init__(
        self,
        entry: CatalogEntry,
        metrics: ModelMetrics,
        engine_factory: EngineFactory,
        turns: asyncio.Lock | None = None,
    ) -> None:
        self.name = entry.name
        self.aliases = entry.aliases
        self.settings = entry.settings
        self.model = entry.model
        self.metrics = metrics
        self._engine_factory = engine_factory
        self._turns = turns  # shared by the models' workers when they take turns on the cores
        self.variant = ""
        self._worker: Worker | None = None
        # From the start, so that a drain asked for during start-up holds once it is done.
        self.admission = model_admission(self.settings, metrics, self._stalled, self._drain_seconds)
        self.pipeline: Pipeline | None = None
        self._queue: PairQueue | None = None
        self.ready = False
        self._warmup: asyncio.Task[None] | None = None
        self._warmup_batches: list[PaddedBatch] = []

    def _stalled(self) -> bool:
        return self._worker is not None and self._worker.stalled

    def _drain_seconds(self, pairs: int) -> float | None:
        return None if self._worker is None else self._worker.drain_seconds(pairs)

    async def start(self) -> None:
        """Build the parts (errors here stop the server); :meth:`warm` warms them up."""
        s = self.settings
        model = self.model
        plan = plan_session(
            s.device,
            ort.get_available_providers(),
            threads=s.threads,
            cuda_device_id=s.cuda_device_id,
            cuda_mem_limit_mb=s.cuda_mem_limit_mb,
            nice=s.engine_nice,
        )
        encoder = load_pair_encoder(model)
        windows = self._windows(encoder, model.metadata.name)
        # The tokeniser's Rust thread pool is made by its first parallel call, this one: made
        # on a lowered thread, its threads inherit the lower priority (crossrank.ops.priority).
        probe = build_on_lowered_thread(
            s.engine_nice, lambda: encoder.encode("warm up", ["the engine answers"])
        ).pairs
        batch_tokens = s.max_batch_tokens or AUTO_BATCH_TOKENS[plan.device]
        meta = model.metadata
        batches = warmup_batches(probe[0], meta.max_length, batch_tokens, s.max_batch_pairs)
        choice, engine = await self._load_engine(model, plan, batches)
        self._worker = Worker(
            engine,
            self.metrics,
            probe=pad_pairs(probe),
            watchdog=WatchdogLimits(multiple=s.watchdog_multiple, floor_s=s.watchdog_floor_s),
            turns=self._turns,
        )
        self._queue = PairQueue(
            self._worker,
            BatchLimits(
                max_batch_tokens=batch_tokens,
                max_batch_pairs=s.max_batch_pairs,
                max_wait_s=s.max_wait_ms / 1000,
                aging_s=s.aging_s,
                batch_aging_s=s.batch_aging_s,
            ),
            length_sorting=s.length_sorting,
            metrics=self.metrics,
        )
        self._worker.on_stall = self._queue.stall
        self._queue.start()
        self.pipeline = self._pipeline(model, encoder, windows, self._queue, choice.variant)
        self.variant = choice.variant
        self._announce(model, choice, engine.provider)
        self._warmup_batches = batches

    def warm(self) -> None:
        """Warm up in the background: every kernel shape once, before the model is ready."""
        batches = self._warmup_batches
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up(batches))

    def _windows(
        self, encoder: PairTokenizer | PromptTokenizer, name: str
    ) -> WindowTokenizer | None:
        """The model's window tokenizer at the server's stride; None for a model that cannot
        chunk (refused at start if chunking is the server's default)."""
        s = self.settings
        if isinstance(encoder, PromptTokenizer):
            if s.long_passages == "chunk":
                raise ValueError(f"{name} cannot chunk long passages: set long_passages truncate")
            return None
        try:
            return encoder.windows(s.chunk_stride)
        except ValueError as exc:
            raise ValueError(f"chunk_stride for {name}: {exc}") from None

    async def _load_engine(
        self, model: ModelDir, plan: SessionPlan, batches: list[PaddedBatch]
    ) -> tuple[Choice, Engine]:
        # variant auto on a CPU times the candidates on a warm-up batch
        # (crossrank.model.variant_choice), on a thread of its own: running batches lowers a
        # thread's priority (crossrank.ops.priority), which a thread of the loop's shared
        # executor would keep.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-load") as loader:
            return await asyncio.get_running_loop().run_in_executor(
                loader,
                load_variant,
                model,
                self.settings.variant,
                plan,
                self._engine_factory,
                batches,
                read_cpu_flags(),
            )

    def _pipeline(
        self,
        model: ModelDir,
        encoder: PairTokenizer | PromptTokenizer,
        windows: WindowTokenizer | None,
        queue: PairQueue,
        variant: str,
    ) -> Pipeline:
        s = self.settings
        meta = model.metadata
        cache = None
        if s.score_cache_bytes:
            salt = f"{meta.name}|{variant}|{meta.max_length}"
            cache = ScoreCache(s.score_cache_bytes, salt, self.metrics)
        return Pipeline(
            encoder,
            windows,
            queue,
            ScoreScale(meta.activation, meta.calibration_for(variant)),
            self.metrics,
            max_passages=s.max_passages,
            default_timeout_ms=s.default_timeout_ms,
            long_passages=LongPassages(
                s.long_passages == "chunk", Aggregation(s.chunk_aggregation), s.max_chunks_per_doc
            ),
            default_budget_ms=s.default_budget_ms,
            cache=cache,
            nice=s.engine_nice,
        )

    def _announce(self, model: ModelDir, choice: Choice, provider: str) -> None:
        name = model.metadata.name
        self.metrics.model.info(
            {
                "name": name,
                "variant": choice.variant,
                "variant_choice": choice.basis,
                "provider": provider,
            }
        )
        log.info(
            "model %s: %s (%s, by %s: %s) loaded from %s",
            self.name,
            name,
            choice.variant,
            choice.basis,
            choice.detail,
            model.path,
        )

    async def _warm_up(self, batches: list[PaddedBatch]) -> None:
        assert self._worker is not None
        try:
            await self._worker.warm_up(batches)
        except Exception:
            log.exception("warm-up of %s failed: the service stays not ready", self.name)
            self._worker.fail_warm_up()
            return
        # What is alive now lives as long as the service. Frozen, it is no longer walked by
        # each full pass of the cyclic collector: a pause of the event loop, and so of every
        # request in flight and every refusal, as long as that walk.
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("%s: warm-up done over %d length buckets: ready", self.name, len(batches))

    async def stop(self, deadline: float) -> None:
        """Refuse new requests, wait until ``deadline`` (monotonic) for the admitted ones,
        then stop the parts."""
        self.admission.drain()
        if self._warmup is not None:
            self._warmup.cancel()
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await self.admission.wait_empty()
        except TimeoutError:
            # A hung engine or a longer queue than the grace allows: exit anyway, as the
            # orchestrator would kill the process at the end of its own grace period.
            log.error(
                "drain grace over with %d pairs of %s unanswered: stopping",
                self.admission.reserved,
                self.name,
            )
        if self._queue is not None:
            await self._queue.close()
        if self._worker is not None:
            self._worker.close()
        if self.pipeline is not None:
            self.pipeline.close()

    def describe(self) -> dict[str, Any]:
        """The model being served and what its scores mean (GET /info)."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            **describe(self.model, self.variant, self.settings),
        }

    def readiness(self) -> str | None:
        """Why the model is not ready, or None when it is."""
        if not self.ready:
            return "warming up" if self._warmup and not self._warmup.done() else "warm-up failed"
        if self._worker is not None and self._worker.stalled:
            return "engine stalled"
        if self._worker is not None and not self._worker.healthy:
            return "engine failing"
        return None

    def liveness(self) -> str | None:
        """Why the process should be restarted, or None while it is fine."""
        if self._worker is None:
            return None
        stuck = self._worker.stuck_for(time.monotonic())
        if stuck > self.settings.watchdog_liveness_s:
            return f"engine stuck: a batch has run {stuck:.0f} s"
        return None

    def require_ready(self) -> Pipeline:
        """The pipeline, or why requests cannot be served yet."""
        if self.admission.draining:
            raise ServiceError(ErrorType.SHUTTING_DOWN, "the service is shutting down")
        if not self.ready or self.pipeline is None:
            raise ServiceError(
                ErrorType.NOT_READY, f"the model {self.name} is still warming up: retry later"
            )
        return self.pipeline


def describe(model: ModelDir, variant: str, settings: Settings) -> dict[str, Any]:
    """The model being served and what its scores mean (GET /info)."""
    meta = model.metadata
    calibration = meta.calibration_for(variant)
    if calibration is not None:
        score = (
            f"calibrated probability of relevance ({calibration.method} scaling of the "
            f"logit, fitted on {calibration.fitted_on}); raw_scores gives the logit"
        )
        if calibration.variant != variant:
            score += (
                f"; fitted on {calibration.variant}'s logits, not on the {variant} served: "
                "run crossrank calibrate for it"
            )
    elif meta.activation is Activation.SIGMOID:
        score = "sigmoid of the logit (not calibrated); raw_scores gives the logit"
    else:
        score = "the logit (not calibrated: meaningful only relative to other passages' scores)"
    return {
        "model": meta.name,
        "variant": variant,
        "max_length": meta.max_length,
        "max_query_tokens": meta.max_query_tokens,
        "activation": meta.activation.value,
        "calibrated": calibration is not None,
        "score": score,
        "calibration": calibration.model_dump(mode="json") if calibration else None,
        "score_cache_bytes": settings.score_cache_bytes,
        "long_passages": {
            "default": settings.long_passages,
            "chunk_stride": settings.chunk_stride,
            "chunk_aggregation": settings.chunk_aggregation,
            "max_chunks_per_doc": settings.max_chunks_per_doc,
        },
    }
