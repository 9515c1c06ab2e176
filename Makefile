# Two commands for a fresh machine: `make serve` and `make test` (each sets itself up first).
PYTHON ?= python3
VENV ?= .venv
MODEL ?= models/crossrank-minilm-l6
PORT ?= 8080
BIN := $(VENV)/bin

.PHONY: serve test lint setup-serve setup-dev

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

test: lint
	$(BIN)/pytest -q -p no:cacheprovider
