"""The ASGI application: the service, its routes and middleware, and every exception answered
through the one error map (crossrank.http.errors)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from crossrank import __version__
from crossrank.core.errors import ServiceError
from crossrank.core.service import Service
from crossrank.http.auth import ApiKeyMiddleware
from crossrank.http.body_limit import BodyLimitMiddleware
from crossrank.http.context import RequestContextMiddleware
from crossrank.http.errors import ErrorResponder, http_error, validation_error
from crossrank.http.gate import AdmissionGateMiddleware
from crossrank.http.invalid_budget import InvalidBudget
from crossrank.http.routes import router
from crossrank.http.tracing import Tracing, traces_endpoint
from crossrank.model.engine import OnnxEngine
from crossrank.model.fault import stalling
from crossrank.model.variant_choice import EngineFactory
from crossrank.ops.metrics import Metrics
from crossrank.ops.settings import Settings

# The scoring endpoints, by the label of their duration metric.
ENDPOINT_LABELS = {"/rerank": "/rerank", "/v1/rerank": "/v1/rerank", "/v2/rerank": "/v1/rerank"}


def create_app(settings: Settings, engine_factory: EngineFactory = OnnxEngine) -> FastAPI:
    if settings.test_stall_file:
        stall = settings.test_stall_file.replace("{port}", str(settings.port))
        engine_factory = stalling(engine_factory, Path(stall))
    metrics = Metrics()
    service = Service(settings, metrics, engine_factory)
    respond = ErrorResponder(metrics, settings.retry_after_s, settings.retry_after_max_s)
    endpoint = traces_endpoint(settings.otlp_endpoint)
    tracing = None if endpoint is None else Tracing(endpoint)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()
        if tracing is not None:
            tracing.shutdown()

    app = FastAPI(
        title="crossrank",
        version=__version__,
        description="Cross-encoder re-ranking with dynamic batching into onnxruntime.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(router)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return respond(exc, request.scope)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return respond(validation_error(exc), request.scope)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        return respond(http_error(exc), request.scope)

    _add_middleware(app, settings, service, metrics, respond, tracing)
    return app


def _add_middleware(
    app: FastAPI,
    settings: Settings,
    service: Service,
    metrics: Metrics,
    respond: ErrorResponder,
    tracing: Tracing | None,
) -> None:
    # Innermost: a request is authenticated and its declared size checked before admission.
    app.add_middleware(
        AdmissionGateMiddleware,
        paths=ENDPOINT_LABELS.keys(),
        service=service,
        max_passages=settings.max_passages,
        invalid=InvalidBudget(settings.invalid_per_s, settings.invalid_burst),
        respond=respond,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        respond=respond,
    )
    keys = settings.load_api_keys()
    if keys:
        # Probes stay open: a kubelet sends no key.
        open_paths = {"/health", "/ready"}
        if not settings.metrics_require_key:
            open_paths.add("/metrics")
        app.add_middleware(
            ApiKeyMiddleware, keys=keys, open_paths=open_paths, metrics=metrics, respond=respond
        )
    # Added last, so outermost: every response, whatever answered it, carries the request id
    # and is timed.
    app.add_middleware(
        RequestContextMiddleware,
        access=settings.access_log,
        endpoints=ENDPOINT_LABELS,
        metrics=metrics,
        respond=respond,
        tracing=tracing,
    )
