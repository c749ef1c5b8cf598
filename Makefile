# `make demo` and `make test` work on a fresh machine: each creates .venv when missing and
# installs what it needs. PY can point at another interpreter (python3.10+).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject's `export` extra (README, "Install": its CPU build).
EXTRAS ?= cpu,export,hf,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test test-fast lint format bench protos perf-analyzer system-deps clean help

help:
	@echo "make demo       train -> export -> quantize -> gate -> serve, on the built-in model"
	@echo "make test       the full test suite, slow end-to-end runs included"
	@echo "make test-fast  the test suite without the slow end-to-end runs"
	@echo "make lint       ruff, and mypy's type check"
	@echo "make bench      benchmarks (side-by-side ratios; export, quantize, serve and access_log write their"
	@echo "                tables into docs/BENCHMARKS.md, the others print theirs)"
	@echo "make protos     regenerate the gRPC code from protos/*.proto"

# Debian packages: python3-venv (the venv needs ensurepip) and openssl (the TLS tests make
# their certificates with it). apt-get installs what is missing when it can.
system-deps:
	@missing=""; \
	$(PY) -c "import ensurepip" 2>/dev/null || missing="$$missing python3-venv"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (install them: sudo apt-get install$$missing)" >&2; \
	    exit 1; \
	  fi; \
	fi

$(BIN)/python: | system-deps
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

test: system-deps $(STAMP) perf-analyzer
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/typecheck.py

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# gpu_check runs at full size only where there is an NVIDIA GPU; elsewhere its CPU check.
bench: $(STAMP) perf-analyzer
	set -e; for b in export quantize serve access_log codec grpc_transport; do \
	  echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py; done
	$(BIN)/python bench/gpu_check.py $$(command -v nvidia-smi >/dev/null || echo --quick)

protos: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

clean:
	rm -rf artifacts bundles .pytest_cache .ruff_cache build *.egg-info
