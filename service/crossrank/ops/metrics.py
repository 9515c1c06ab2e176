"""Prometheus metrics. Each app owns its registry; every labelled series is created at start-up
so that dashboards and alerts see zeros, not gaps, before the first request."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Seconds: a 10-pair CPU request takes tens of ms, a 1,000-pair fp32 one tens of seconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
FAST_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

ENDPOINTS = ("/rerank", "/v1/rerank")
STATUSES = ("200", "400", "401", "408", "413", "422", "429", "500", "503", "504")
PRIORITIES = ("interactive", "batch")
DROP_REASONS = ("deadline", "budget", "disconnected", "failed", "stalled")
REJECT_REASONS = (
    "queue_full",
    "key_over_share",
    "too_many_invalid",
    "not_ready",
    "shutting_down",
    "engine_stalled",
    "invalid",
    "too_large",
    "body_timeout",
)
AUTH_FAILURE_REASONS = ("missing", "malformed", "wrong_key")
# The label of every series about one model's work: its name as served.
MODEL = ("model",)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "crossrank_request_duration_seconds",
            "End-to-end time of a rerank request, by endpoint, HTTP status and priority.",
            ["endpoint", "status", "model", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "crossrank_queue_wait_seconds",
            "Time from a request's admission to the dispatch of each batch holding its pairs.",
            buckets=LATENCY_BUCKETS,
            labelnames=MODEL,
            registry=r,
        )
        self.tokenization = Histogram(
            "crossrank_tokenization_seconds",
            "Time to tokenise one request's pairs.",
            buckets=FAST_BUCKETS,
            labelnames=MODEL,
            registry=r,
        )
        self.batch_inference = Histogram(
            "crossrank_batch_inference_seconds",
            "Time the engine took for one batch.",
            buckets=LATENCY_BUCKETS,
            labelnames=MODEL,
            registry=r,
        )
        self.batch_pairs = Histogram(
            "crossrank_batch_pairs",
            "Pairs per batch.",
            buckets=PAIR_BUCKETS,
            labelnames=MODEL,
            registry=r,
        )
        self.batch_padded_tokens = Histogram(
            "crossrank_batch_padded_tokens",
            "Tokens per batch counting padding (padded length x pairs).",
            buckets=TOKEN_BUCKETS,
            labelnames=MODEL,
            registry=r,
        )
        self.padding_efficiency = Histogram(
            "crossrank_batch_padding_efficiency",
            "Real tokens / padded tokens of each batch.",
            buckets=RATIO_BUCKETS,
            labelnames=MODEL,
            registry=r,
        )
        self.queue_depth = Gauge(
            "crossrank_queue_depth_pairs",
            "Pairs admitted and not yet dispatched.",
            labelnames=MODEL,
            registry=r,
        )
        self.queue_capacity = Gauge(
            "crossrank_queue_capacity_pairs",
            "The admission bound on queued pairs (max_queued_pairs): dashboards and alerts "
            "compare crossrank_queue_depth_pairs with it.",
            labelnames=MODEL,
            registry=r,
        )
        self.reserved_pairs = Gauge(
            "crossrank_reserved_pairs",
            "Queue room held (bounded by max_queued_pairs): pairs of admitted requests being "
            "tokenised, queued or scored.",
            labelnames=MODEL,
            registry=r,
        )
        self.batch_queue_capacity = Gauge(
            "crossrank_batch_queue_capacity_pairs",
            "The admission bound on batch-priority pairs (max_batch_queued_pairs), apart from "
            "the interactive bound.",
            labelnames=MODEL,
            registry=r,
        )
        self.batch_reserved_pairs = Gauge(
            "crossrank_batch_reserved_pairs",
            "Batch-priority room held (bounded by max_batch_queued_pairs).",
            labelnames=MODEL,
            registry=r,
        )
        self.inflight_requests = Gauge(
            "crossrank_inflight_requests",
            "Requests admitted and not yet answered.",
            labelnames=MODEL,
            registry=r,
        )
        self.pairs = Counter(
            "crossrank_pairs", "Pairs scored by the engine.", labelnames=MODEL, registry=r
        )
        self.tokens = Counter(
            "crossrank_tokens",
            "Real (unpadded) tokens scored by the engine.",
            labelnames=MODEL,
            registry=r,
        )
        self.dropped_pairs = Counter(
            "crossrank_dropped_pairs",
            "Admitted pairs dropped before inference, by reason "
            "(failed: a batch of their request, or the queue itself, failed).",
            ["reason", "model"],
            registry=r,
        )
        self.rejected_requests = Counter(
            "crossrank_rejected_requests",
            "Requests refused, by reason (model: empty when refused before its body named one).",
            ["reason", "model"],
            registry=r,
        )
        self.auth_failures = Counter(
            "crossrank_auth_failures",
            "Requests refused with 401, by reason (missing header, not 'Bearer KEY', unknown key).",
            ["reason"],
            registry=r,
        )
        self.score_cache_hits = Counter(
            "crossrank_score_cache_hits",
            "Pairs answered by the score cache (never queued).",
            labelnames=MODEL,
            registry=r,
        )
        self.score_cache_misses = Counter(
            "crossrank_score_cache_misses",
            "Pairs the score cache did not hold (queued and scored).",
            labelnames=MODEL,
            registry=r,
        )
        self.score_cache_bytes = Gauge(
            "crossrank_score_cache_bytes",
            "Memory held by the score cache's entries.",
            labelnames=MODEL,
            registry=r,
        )
        self.score_cache_capacity = Gauge(
            "crossrank_score_cache_capacity_bytes",
            "The score cache's bound (score_cache_bytes; 0: no cache).",
            labelnames=MODEL,
            registry=r,
        )
        self.partial_answers = Counter(
            "crossrank_partial_answers",
            "Answers a latency budget cut short: some of their passages were not scored.",
            labelnames=MODEL,
            registry=r,
        )
        self.unscored_pairs = Counter(
            "crossrank_unscored_pairs",
            "Passages answered unscored because their request's latency budget passed.",
            labelnames=MODEL,
            registry=r,
        )
        self.engine_failures = Counter(
            "crossrank_engine_failures",
            "Batches whose inference raised.",
            labelnames=MODEL,
            registry=r,
        )
        self.engine_stalls = Counter(
            "crossrank_engine_stalls",
            "Batches the watchdog found overdue (the engine hung; see watchdog_* settings).",
            labelnames=MODEL,
            registry=r,
        )
        self.engine_healthy = Gauge(
            "crossrank_engine_healthy",
            "1 when the engine is loaded, warm and working.",
            labelnames=MODEL,
            registry=r,
        )
        self.model = Info("crossrank_model", "The models being served.", MODEL, registry=r)
        self._models: list[str] = []

    def for_model(self, name: str) -> ModelMetrics:
        """The series of one model, every labelled one created now: dashboards and alerts see
        zeros, not gaps, before its first request."""
        self._models.append(name)
        for endpoint in ENDPOINTS:
            for status in STATUSES:
                for priority in PRIORITIES:
                    self.request_duration.labels(endpoint, status, name, priority)
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason, name)
        return ModelMetrics(self, name)

    def unattributed(self) -> None:
        """The series of requests answered before a model was named (401, 413, bad JSON)."""
        for endpoint in ENDPOINTS:
            for status in STATUSES:
                self.request_duration.labels(endpoint, status, "", "interactive")
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason, "")
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)


class ModelMetrics:
    """One model's series, bound to its ``model`` label: what its admission, queue, worker,
    pipeline and score cache write to."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        def bound(metric: Any) -> Any:  # any of prometheus_client's metric types
            return metric.labels(model=name)

        m = metrics
        self.name = name
        self.queue_wait = bound(m.queue_wait)
        self.tokenization = bound(m.tokenization)
        self.batch_inference = bound(m.batch_inference)
        self.batch_pairs = bound(m.batch_pairs)
        self.batch_padded_tokens = bound(m.batch_padded_tokens)
        self.padding_efficiency = bound(m.padding_efficiency)
        self.queue_depth = bound(m.queue_depth)
        self.queue_capacity = bound(m.queue_capacity)
        self.reserved_pairs = bound(m.reserved_pairs)
        self.batch_queue_capacity = bound(m.batch_queue_capacity)
        self.batch_reserved_pairs = bound(m.batch_reserved_pairs)
        self.inflight_requests = bound(m.inflight_requests)
        self.pairs = bound(m.pairs)
        self.tokens = bound(m.tokens)
        self.score_cache_hits = bound(m.score_cache_hits)
        self.score_cache_misses = bound(m.score_cache_misses)
        self.score_cache_bytes = bound(m.score_cache_bytes)
        self.score_cache_capacity = bound(m.score_cache_capacity)
        self.partial_answers = bound(m.partial_answers)
        self.unscored_pairs = bound(m.unscored_pairs)
        self.engine_failures = bound(m.engine_failures)
        self.engine_stalls = bound(m.engine_stalls)
        self.engine_healthy = bound(m.engine_healthy)
        self.model = bound(m.model)
        self.dropped = {reason: m.dropped_pairs.labels(reason, name) for reason in DROP_REASONS}
        self.model.info({"name": "", "variant": "", "provider": ""})
