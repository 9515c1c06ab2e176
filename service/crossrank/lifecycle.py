"""The service's parts and their life: load, warm up, serve, drain."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnxruntime as ort

from crossrank.batcher import Batcher
from crossrank.chunking import Aggregation
from crossrank.collate import PaddedBatch, pad_pairs
from crossrank.engine import OnnxEngine, plan_session
from crossrank.errors import ErrorType, ServiceError
from crossrank.metrics import Metrics
from crossrank.model_dir import Activation, ModelDir, load_model_dir
from crossrank.priority import build_on_lowered_thread
from crossrank.reranker import LongPassages, Reranker
from crossrank.scheduling import AUTO_BATCH_TOKENS, BatchLimits
from crossrank.score_cache import ScoreCache
from crossrank.settings import Settings
from crossrank.tokenization import EncodedPair, load_pair_encoder
from crossrank.variant_choice import EngineFactory, load_variant, read_cpu_flags
from crossrank.watchdog import WatchdogLimits

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


class Service:
    def __init__(
        self, settings: Settings, metrics: Metrics, engine_factory: EngineFactory = OnnxEngine
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._engine_factory = engine_factory
        self.model: ModelDir | None = None
        self.reranker: Reranker | None = None
        self.batcher: Batcher | None = None
        self.variant = ""
        self.ready = False
        self.draining = False
        self._drain_deadline = float("inf")
        self._warmup: asyncio.Task[None] | None = None

    @property
    def model_name(self) -> str:
        return self.model.metadata.name if self.model else ""

    async def start(self) -> None:
        """Load the model (errors here stop the server), then warm up in the background."""
        s = self.settings
        model = load_model_dir(s.model)
        plan = plan_session(
            s.device,
            ort.get_available_providers(),
            threads=s.threads,
            cuda_device_id=s.cuda_device_id,
            cuda_mem_limit_mb=s.cuda_mem_limit_mb,
            nice=s.engine_nice,
        )
        meta = model.metadata
        tokenizer = load_pair_encoder(model)
        window = tokenizer.min_window
        if s.long_passages == "chunk" and window is None:
            raise ValueError(f"{meta.name} cannot chunk long passages: set long_passages truncate")
        if window is not None and s.chunk_stride >= window:
            raise ValueError(
                f"chunk_stride {s.chunk_stride} must be under the {window} passage tokens a "
                f"window of {meta.name} holds beside a full query"
            )
        # The tokeniser's Rust thread pool is made by its first parallel call, this one: made
        # on a lowered thread, its threads inherit the lower priority (crossrank.priority).
        probe = build_on_lowered_thread(
            s.engine_nice, lambda: tokenizer.encode("warm up", ["the engine answers"])
        ).pairs
        batch_tokens = s.max_batch_tokens or AUTO_BATCH_TOKENS[plan.device]
        batches = warmup_batches(probe[0], meta.max_length, batch_tokens, s.max_batch_pairs)
        # variant auto on a CPU times the candidates on a warm-up batch (crossrank.variant_choice),
        # on a thread of its own: running batches lowers a thread's priority (crossrank.priority),
        # which a thread of the loop's shared executor would keep.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-load") as loader:
            choice, engine = await asyncio.get_running_loop().run_in_executor(
                loader,
                load_variant,
                model,
                s.variant,
                plan,
                self._engine_factory,
                batches,
                read_cpu_flags(),
            )
        variant = choice.variant
        self.batcher = Batcher(
            engine,
            BatchLimits(
                max_batch_tokens=batch_tokens,
                max_batch_pairs=s.max_batch_pairs,
                max_wait_s=s.max_wait_ms / 1000,
                aging_s=s.aging_s,
            ),
            max_queued_pairs=s.max_queued_pairs,
            length_sorting=s.length_sorting,
            metrics=self.metrics,
            probe=probe,
            watchdog=WatchdogLimits(
                multiple=s.watchdog_multiple,
                floor_s=s.watchdog_floor_s,
                liveness_s=s.watchdog_liveness_s,
            ),
        )
        self.batcher.start()
        self.metrics.queue_capacity.set(s.max_queued_pairs)
        self.reranker = Reranker(
            tokenizer,
            self.batcher,
            meta.activation,
            self.metrics,
            calibration=meta.calibration,
            max_passages=s.max_passages,
            default_timeout_ms=s.default_timeout_ms,
            nice=s.engine_nice,
            cache=(
                ScoreCache(
                    s.score_cache_bytes, f"{meta.name}|{variant}|{meta.max_length}", self.metrics
                )
                if s.score_cache_bytes
                else None
            ),
            long_passages=LongPassages(
                s.long_passages == "chunk",
                s.chunk_stride,
                Aggregation(s.chunk_aggregation),
                s.max_chunks_per_doc,
            ),
        )
        self.model = model
        self.variant = variant
        self.metrics.model.info(
            {
                "name": meta.name,
                "variant": variant,
                "variant_choice": choice.basis,
                "provider": engine.provider,
            }
        )
        log.info(
            "model %s (%s, by %s: %s) loaded from %s",
            meta.name,
            variant,
            choice.basis,
            choice.detail,
            model.path,
        )
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up(batches))

    async def _warm_up(self, batches: list[PaddedBatch]) -> None:
        assert self.batcher is not None
        try:
            await self.batcher.warm_up(batches)
        except Exception:
            log.exception("warm-up failed: the service stays not ready")
            self.batcher.healthy = False
            self.metrics.engine_healthy.set(0)
            return
        # What is alive now lives as long as the service. Frozen, it is no longer walked by
        # each full pass of the cyclic collector: a pause of the event loop, and so of every
        # request in flight and every refusal, as long as that walk.
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("warm-up done over %d length buckets: ready", len(batches))

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests from now on; admitted ones are still answered, within
        ``drain_grace_s`` from now."""
        if not self.draining:
            self._drain_deadline = time.monotonic() + self.settings.drain_grace_s
        self.draining = True
        if self.batcher is not None:
            self.batcher.begin_drain()

    async def stop(self) -> None:
        self.begin_drain()
        if self._warmup is not None:
            self._warmup.cancel()
        if self.batcher is not None:
            try:
                async with asyncio.timeout(self._drain_deadline - time.monotonic()):
                    await self.batcher.close()
            except TimeoutError:
                # A hung engine or a longer queue than the grace allows: exit anyway, as the
                # orchestrator would kill the process at the end of its own grace period.
                log.error(
                    "drain grace of %.0f s over with %d pairs unanswered: stopping",
                    self.settings.drain_grace_s,
                    self.batcher.reserved_pairs,
                )
        if self.reranker is not None:
            self.reranker.close()

    def describe(self) -> dict[str, Any]:
        """The model being served and what its scores mean (GET /info)."""
        if self.model is None:
            raise ServiceError(ErrorType.NOT_READY, "the model is still loading: retry later")
        meta = self.model.metadata
        calibration = meta.calibration
        if calibration is not None:
            score = (
                f"calibrated probability of relevance ({calibration.method} scaling of the "
                f"logit, fitted on {calibration.fitted_on}); raw_scores gives the logit"
            )
        elif meta.activation is Activation.SIGMOID:
            score = "sigmoid of the logit (not calibrated); raw_scores gives the logit"
        else:
            score = "the logit (not calibrated: meaningful only relative to other passages' scores)"
        return {
            "model": meta.name,
            "variant": self.variant,
            "max_length": meta.max_length,
            "max_query_tokens": meta.max_query_tokens,
            "activation": meta.activation.value,
            "calibrated": calibration is not None,
            "score": score,
            "calibration": calibration.model_dump(mode="json") if calibration else None,
            "score_cache_bytes": self.settings.score_cache_bytes,
            "long_passages": {
                "default": self.settings.long_passages,
                "chunk_stride": self.settings.chunk_stride,
                "chunk_aggregation": self.settings.chunk_aggregation,
                "max_chunks_per_doc": self.settings.max_chunks_per_doc,
            },
        }

    def readiness(self) -> str | None:
        """Why the service is not ready, or None when it is."""
        if self.draining:
            return "shutting down"
        if not self.ready:
            return "warming up" if self._warmup and not self._warmup.done() else "warm-up failed"
        if self.batcher is not None and self.batcher.stalled_since is not None:
            return "engine stalled"
        if self.batcher is not None and not self.batcher.healthy:
            return "engine failing"
        return None

    def liveness(self) -> str | None:
        """Why the process should be restarted, or None while it is fine."""
        if self.batcher is None:
            return None
        stuck = self.batcher.stuck_for(time.monotonic())
        if stuck > self.settings.watchdog_liveness_s:
            return f"engine stuck: a batch has run {stuck:.0f} s"
        return None

    def require_ready(self) -> Reranker:
        if self.draining:
            raise ServiceError(ErrorType.SHUTTING_DOWN, "the service is shutting down")
        if not self.ready or self.reranker is None:
            raise ServiceError(ErrorType.NOT_READY, "the model is still warming up: retry later")
        return self.reranker
