"""Prometheus metrics. Each app owns its registry; every labelled series is created at start-up
so that dashboards and alerts see zeros, not gaps, before the first request."""

from __future__ import annotations

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
STATUSES = ("200", "400", "401", "408", "413", "422", "500", "503", "504")
DROP_REASONS = ("deadline", "disconnected", "failed", "stalled")
REJECT_REASONS = (
    "queue_full",
    "not_ready",
    "shutting_down",
    "engine_stalled",
    "invalid",
    "too_large",
    "body_timeout",
)
AUTH_FAILURE_REASONS = ("missing", "malformed", "wrong_key")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "crossrank_request_duration_seconds",
            "End-to-end time of a rerank request, by endpoint and HTTP status.",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "crossrank_queue_wait_seconds",
            "Time from a request's admission to the dispatch of each batch holding its pairs.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenization = Histogram(
            "crossrank_tokenization_seconds",
            "Time to tokenise one request's pairs.",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.batch_inference = Histogram(
            "crossrank_batch_inference_seconds",
            "Time the engine took for one batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_pairs = Histogram(
            "crossrank_batch_pairs", "Pairs per batch.", buckets=PAIR_BUCKETS, registry=r
        )
        self.batch_padded_tokens = Histogram(
            "crossrank_batch_padded_tokens",
            "Tokens per batch counting padding (padded length x pairs).",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_efficiency = Histogram(
            "crossrank_batch_padding_efficiency",
            "Real tokens / padded tokens of each batch.",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "crossrank_queue_depth_pairs", "Pairs admitted and not yet dispatched.", registry=r
        )
        self.queue_capacity = Gauge(
            "crossrank_queue_capacity_pairs",
            "The admission bound on queued pairs (max_queued_pairs): dashboards and alerts "
            "compare crossrank_queue_depth_pairs with it.",
            registry=r,
        )
        self.reserved_pairs = Gauge(
            "crossrank_reserved_pairs",
            "Queue room held (bounded by max_queued_pairs): pairs of admitted requests being "
            "tokenised, queued or scored.",
            registry=r,
        )
        self.inflight_requests = Gauge(
            "crossrank_inflight_requests", "Requests admitted and not yet answered.", registry=r
        )
        self.pairs = Counter("crossrank_pairs", "Pairs scored by the engine.", registry=r)
        self.tokens = Counter(
            "crossrank_tokens", "Real (unpadded) tokens scored by the engine.", registry=r
        )
        self.dropped_pairs = Counter(
            "crossrank_dropped_pairs",
            "Admitted pairs dropped before inference, by reason "
            "(failed: a batch of their request, or the queue itself, failed).",
            ["reason"],
            registry=r,
        )
        self.rejected_requests = Counter(
            "crossrank_rejected_requests",
            "Requests refused, by reason.",
            ["reason"],
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
            registry=r,
        )
        self.score_cache_misses = Counter(
            "crossrank_score_cache_misses",
            "Pairs the score cache did not hold (queued and scored).",
            registry=r,
        )
        self.score_cache_bytes = Gauge(
            "crossrank_score_cache_bytes", "Memory held by the score cache's entries.", registry=r
        )
        self.score_cache_capacity = Gauge(
            "crossrank_score_cache_capacity_bytes",
            "The score cache's bound (score_cache_bytes; 0: no cache).",
            registry=r,
        )
        self.engine_failures = Counter(
            "crossrank_engine_failures", "Batches whose inference raised.", registry=r
        )
        self.engine_stalls = Counter(
            "crossrank_engine_stalls",
            "Batches the watchdog found overdue (the engine hung; see watchdog_* settings).",
            registry=r,
        )
        self.engine_healthy = Gauge(
            "crossrank_engine_healthy", "1 when the engine is loaded, warm and working.", registry=r
        )
        self.model = Info("crossrank_model", "The model being served.", registry=r)
        for endpoint in ENDPOINTS:
            for status in STATUSES:
                self.request_duration.labels(endpoint, status)
        for reason in DROP_REASONS:
            self.dropped_pairs.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        self.model.info({"name": "", "variant": "", "provider": ""})
