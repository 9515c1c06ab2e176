# Two commands for a fresh machine: `make serve` and `make test` (each sets itself up first).
PYTHON ?= python3
VENV ?= .venv
MODEL ?= models/crossrank-minilm-l6
PORT ?= 8080
BIN := $(VENV)/bin

# onnxruntime for the container images: the release whose CUDA build Dockerfile.gpu's base fits.
ORT_VERSION ?= 1.31.1

.PHONY: serve test lint setup-serve setup-dev deploy-tools lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The serving install: no torch.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# torch first, pinned to the CPU build, so that nothing resolves a multi-GB CUDA build.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.serve-installed

setup-serve: $(VENV)/.serve-installed
setup-dev: $(VENV)/.dev-installed

serve: setup-serve
	@if [ ! -f "$(MODEL)/crossrank.json" ]; then \
	  echo "No model directory at $(MODEL)."; \
	  echo "crossrank serves a model directory: ONNX cross-encoder + tokenizer.json + crossrank.json."; \
	  echo "Serve one you have with: make serve MODEL=/path/to/model-dir"; \
	  echo "or turn a local Hugging Face cross-encoder checkpoint into one (README, 'Models')."; \
	  exit 2; \
	fi
	$(BIN)/crossrank serve --model $(MODEL) --port $(PORT)

lint: setup-dev
	$(BIN)/ruff check service training tests bench
	$(BIN)/ruff format --check service training tests bench

# What the deploy tests run beside the dev extra's hadolint and kubernetes-validate: Prometheus
# and promtool, docker-compose, shellcheck and kubectl (Debian's). Where a tool cannot be
# installed (not root, no apt) the tests that need it skip and say why; the rest still run.
deploy-tools:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v kubectl >/dev/null || command -v kustomize >/dev/null || missing="$$missing kubectl"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends $$missing; } >/dev/null \
	    || echo "deploy-tools: could not install$$missing; their tests will fail"; \
	else echo "deploy-tools: not root or no apt-get; missing$$missing: their tests will skip"; fi

# The images' pinned serving dependencies (no torch; the otel extra, so that an image can
# export traces), resolved in a clean venv.
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install --quiet '.[otel]' onnxruntime==$(ORT_VERSION)
	{ echo "# The container images' serving dependencies, pinned: written by \`make lock\`."; \
	  build/lock-venv/bin/pip freeze --exclude crossrank; } > deploy/requirements-serve.txt
	rm -rf build/lock-venv

# Where deploy-tools can install (root with apt, as CI is), a missing tool fails its tests rather
# than skipping them; elsewhere they skip, saying which tool is missing.
test: lint deploy-tools
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  CROSSRANK_DEPLOY_TOOLS=required $(BIN)/pytest -q -p no:cacheprovider; \
	else $(BIN)/pytest -q -p no:cacheprovider; fi
