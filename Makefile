# `make demo` and `make test` work on a fresh machine: each creates .venv when missing and
# installs what it needs. PY can point at another interpreter (python3.10+).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject's `export` extra (a bare torch pulls a multi-GB CUDA build).
EXTRAS ?= cpu,export,hf,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test test-fast lint format bench protos perf-analyzer clean help

help:
	@echo "make demo       train -> export -> quantize -> gate -> serve, on the built-in model"
	@echo "make test       the full test suite, slow end-to-end runs included"
	@echo "make test-fast  the test suite without the slow end-to-end runs"
	@echo "make lint       ruff"
	@echo "make bench      benchmarks (side-by-side ratios; results go to docs/BENCHMARKS.md)"
	@echo "make protos     regenerate the gRPC code from protos/*.proto"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Triton's perf_analyzer (a real KServe client) for the serving tests, into .tools/.
perf-analyzer: $(STAMP)
	PY=$(BIN)/python scripts/get-perf-analyzer.sh

test: $(STAMP) perf-analyzer
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) perf-analyzer
	@ls bench/*.py >/dev/null
	for b in bench/[a-z]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf artifacts .pytest_cache .ruff_cache build *.egg-info
