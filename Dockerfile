# syntax=docker/dockerfile:1
# crossrank, CPU image: `docker build -t crossrank:0.1.0 .` (GPU: Dockerfile.gpu). The serving
# install only (no torch), the bundled default model inside, a non-root user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# The pinned dependencies first (`make lock` writes them), so this layer is rebuilt only when the
# lock changes, not on every code change.
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
RUN /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements-serve.txt
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY training /src/training
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /src

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="crossrank" \
      org.opencontainers.image.description="Cross-encoder re-ranking service (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 crossrank \
    && useradd --system --uid 10001 --gid crossrank --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin crossrank
COPY --from=build /opt/venv /opt/venv
COPY models/crossrank-minilm-l6 /opt/crossrank/models/crossrank-minilm-l6
# Every setting is a CROSSRANK_* variable (README "Settings"); these are the image's defaults.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CROSSRANK_MODEL=/opt/crossrank/models/crossrank-minilm-l6 \
    CROSSRANK_HOST=0.0.0.0 \
    CROSSRANK_PORT=8080 \
    CROSSRANK_DEVICE=cpu \
    CROSSRANK_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
# /ready is 200 once the model is loaded and warmed up, 503 while warming, draining or failing.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "crossrank.ops.probe", "/ready"]
# SIGTERM starts the drain: new requests get 503 shutting_down, admitted ones are answered, and
# the process exits within CROSSRANK_DRAIN_GRACE_S (60 s by default, the default deadline). Give
# it the time: `docker run --stop-timeout 75`, compose's stop_grace_period, Kubernetes'
# terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["crossrank", "serve"]
