"""The ASGI application: routes, middleware, and every exception turned into the one error body."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from crossrank import __version__
from crossrank.engine import OnnxEngine
from crossrank.errors import ErrorType, ServiceError, error_response, invalid
from crossrank.lifecycle import EngineFactory, Service
from crossrank.metrics import Metrics
from crossrank.middleware import (
    AdmissionGateMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
    RequestMetricsMiddleware,
)
from crossrank.routes import router
from crossrank.settings import Settings

ENDPOINT_LABELS = {"/rerank": "/rerank", "/v1/rerank": "/v1/rerank", "/v2/rerank": "/v1/rerank"}

REJECT_REASON = {
    ErrorType.QUEUE_FULL: "queue_full",
    ErrorType.NOT_READY: "not_ready",
    ErrorType.SHUTTING_DOWN: "shutting_down",
    ErrorType.ENGINE_STALLED: "engine_stalled",
    ErrorType.INVALID_REQUEST: "invalid",
    ErrorType.BODY_TOO_LARGE: "too_large",
}

HTTP_ERROR_TYPES = {
    404: ErrorType.NOT_FOUND,
    405: ErrorType.METHOD_NOT_ALLOWED,
    408: ErrorType.REQUEST_TIMEOUT,
    413: ErrorType.BODY_TOO_LARGE,
}


def _field(loc: tuple) -> str | None:
    """('body', 'passages', 3) -> 'passages[3]'."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    field = str(parts[0])
    for part in parts[1:]:
        field += f"[{part}]" if isinstance(part, int) else f".{part}"
    return field


def validation_error(exc: RequestValidationError) -> ServiceError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error") or first.get("msg")
        return invalid(f"the body is not valid JSON: {reason}", "body")
    field = _field(tuple(first.get("loc", ()))) or "body"
    if first.get("type") == "missing":
        return invalid(f"{field} is required", field)
    return invalid(f"{field}: {first.get('msg')}", field)


def create_app(settings: Settings, engine_factory: EngineFactory = OnnxEngine) -> FastAPI:
    metrics = Metrics()
    service = Service(settings, metrics, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="crossrank",
        version=__version__,
        description="Cross-encoder re-ranking with dynamic batching into onnxruntime.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(router)

    def respond(error: ServiceError) -> Response:
        reason = REJECT_REASON.get(error.type)
        if reason is not None:
            metrics.rejected_requests.labels(reason).inc()
        return error_response(error, settings.retry_after_s)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> Response:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return respond(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> Response:
        error_type = HTTP_ERROR_TYPES.get(exc.status_code)
        if error_type is None:
            error_type = ErrorType.INVALID_REQUEST if exc.status_code < 500 else ErrorType.INTERNAL
        return respond(ServiceError(error_type, str(exc.detail)))

    # Innermost: a request is authenticated and its declared size checked before admission.
    app.add_middleware(
        AdmissionGateMiddleware,
        paths=ENDPOINT_LABELS.keys(),
        batcher=lambda: service.batcher,
        max_passages=settings.max_passages,
        respond=respond,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        metrics=metrics,
    )
    keys = settings.load_api_keys()
    if keys:
        # Probes stay open: a kubelet sends no key.
        open_paths = {"/health", "/ready"}
        if not settings.metrics_require_key:
            open_paths.add("/metrics")
        app.add_middleware(
            ApiKeyMiddleware,
            keys=keys,
            open_paths=open_paths,
            metrics=metrics,
            retry_after_s=settings.retry_after_s,
        )
    # It times every answer, the body limit's 413s and the 401s included.
    app.add_middleware(RequestMetricsMiddleware, endpoints=ENDPOINT_LABELS, metrics=metrics)
    # Added last, so outermost: every response, whatever answered it, carries the request id.
    app.add_middleware(
        RequestContextMiddleware, access=settings.access_log, retry_after_s=settings.retry_after_s
    )
    return app
