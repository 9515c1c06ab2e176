"""OpenTelemetry traces of the scoring requests, off unless an OTLP endpoint is set.

With ``otlp_endpoint`` (or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), each scoring request is one span, ``rerank`` (kind
SERVER), the child of the client's W3C ``traceparent`` when it sends one, with a child span per
step it went through: ``admission`` (its head and body read, its room acquired: the gate),
``tokenisation``, ``queue`` and ``inference`` (its Trace, crossrank.core.ranking), at the times
measured. The spans are written when the answer has been sent, from what was
recorded, so nothing on the request path waits on tracing; the SDK exports them over OTLP/HTTP in
batches, from a thread of its own. Attributes: the request id, model, priority, status,
passages, tokens and pairs scored.

The SDK is imported only when tracing is on, so the serving install does not need it (`pip
install 'crossrank[otel]'`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from starlette.types import Scope

from crossrank.core.ranking import Trace
from crossrank.http.context import RequestRecord

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def traces_endpoint(otlp_endpoint: str) -> str | None:
    """Where traces go: the setting's base URL + /v1/traces, else the standard variables'
    (the exporter reads them itself), else None: tracing off."""
    if otlp_endpoint:
        return otlp_endpoint.rstrip("/") + "/v1/traces"
    if any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return ""
    return None


class Tracing:
    def __init__(self, endpoint: str, service_name: str = "crossrank") -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.propagate import extract
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, set_span_in_context

        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("crossrank")
        self._extract = extract
        self._server = SpanKind.SERVER
        self._child_of = set_span_in_context

    def record(
        self, scope: Scope, record: RequestRecord, status: int, started: float, ended: float
    ) -> None:
        """The spans of one answered request; ``started`` and ``ended`` are monotonic."""
        to_ns = time.time_ns() - time.monotonic_ns()  # monotonic -> epoch, in ns

        def ns(monotonic: float) -> int:
            return int(monotonic * 1e9) + to_ns

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        trace = record.trace
        attributes: dict[str, Any] = {
            "crossrank.request_id": record.id,
            "crossrank.model": record.model,
            "crossrank.priority": record.priority,
            "http.route": scope["path"],
            "http.response.status_code": status,
        }
        for name, value in (("passages", trace.passages), ("tokens", trace.tokens)):
            if value is not None:
                attributes[f"crossrank.{name}"] = value
        span = self._tracer.start_span(
            "rerank",
            context=self._extract(headers),
            kind=self._server,
            attributes=attributes,
            start_time=ns(started),
        )
        context = self._child_of(span)
        for name, at, ms, details in _steps(record, started):
            child = self._tracer.start_span(
                name, context=context, start_time=ns(at), attributes=details
            )
            child.end(end_time=ns(at + ms / 1000))
        span.end(end_time=ns(ended))

    def shutdown(self) -> None:
        """Export what is left."""
        self._provider.shutdown()


def _steps(record: RequestRecord, started: float) -> list[tuple[str, float, float, dict[str, Any]]]:
    """(name, start, milliseconds, attributes) of each step the request went through."""
    trace: Trace = record.trace
    steps: list[tuple[str, float, float, dict[str, Any]]] = []
    if record.admitted_at is not None:
        steps.append(("admission", started, 1000 * (record.admitted_at - started), {}))
    if trace.tokenize_at is not None and trace.tokenize_ms is not None:
        steps.append(("tokenisation", trace.tokenize_at, trace.tokenize_ms, {}))
    if trace.queue_at is not None and trace.queue_ms is not None:
        steps.append(("queue", trace.queue_at, trace.queue_ms, {}))
        if trace.inference_ms:
            inference_at = trace.queue_at + trace.queue_ms / 1000
            # Its pairs may share batches with other requests': how many batches they went
            # in, and the padded tokens of its own rows there (what padding cost it).
            details = {
                "crossrank.model": record.model,
                "crossrank.batches": trace.batches or 0,
                "crossrank.padded_tokens": trace.padded_tokens or 0,
            }
            steps.append(("inference", inference_at, trace.inference_ms, details))
    return steps
