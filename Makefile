# `make demo` and `make test` work on a fresh machine: each creates .venv when missing and
# installs what it needs. PY can point at another interpreter (python3.10+).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject's `export` extra. On PyPI a Linux torch is the CUDA build
# (GBs); TORCH_INDEX=https://download.pytorch.org/whl/cpu installs its CPU build first.
TORCH_INDEX ?=
EXTRAS ?= cpu,export,hf,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# Written once the venv and its pip work: a venv killed half-made is made again.
CREATED := $(VENV)/.created

.PHONY: demo test test-fast lint format bench protos perf-analyzer test-deps clean help

help:
	@echo "make demo           train -> export -> quantize -> gate -> serve, on the built-in model"
	@echo "make test           the full test suite, slow end-to-end runs included"
	@echo "make test-fast      the test suite without the slow end-to-end runs"
	@echo "make lint           ruff, and mypy's type check"
	@echo "make format         ruff's formatting and fixes, in place"
	@echo "make bench          benchmarks (side-by-side ratios; export, quantize, reranker, qa, serve and access_log write"
	@echo "                    their tables into docs/BENCHMARKS.md, the others print theirs)"
	@echo "make protos         regenerate the gRPC code from protos/*.proto"
	@echo "make perf-analyzer  Triton's perf_analyzer into .tools/ (make test and make bench get it)"
	@echo "make clean          delete artifacts/ and bundles/ (your own bundles there too) and caches; not .venv or .tools/"
	@echo "Variables: PY=python3.11 (the venv's interpreter), TORCH_INDEX=URL (torch's CPU build),"
	@echo "           EXTRAS=gpu,export,hf,dev (onnxruntime-gpu instead of onnxruntime)"

# $(call debian,CHECK,PACKAGE): where the shell command CHECK fails, the Debian PACKAGE is
# installed with apt-get (as root), or asked for.
define debian
if ! $(1) >/dev/null 2>&1; then \
  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
    echo "installing Debian package $(2)"; \
    apt-get update -qq && apt-get install -y -qq $(2) >/dev/null; \
  else \
    echo "missing Debian package $(2) (install it: sudo apt-get install $(2))" >&2; exit 1; \
  fi; \
fi
endef

# A venv whose pip runs is kept; one without (killed while it was made) is made again with
# PY (`venv --clear` empties that venv alone). A directory there that is no venv is refused,
# never emptied.
$(CREATED):
	@if $(BIN)/python -m pip --version >/dev/null 2>&1; then touch $@; exit 0; fi; \
	if [ -d $(VENV) ] && [ -n "$$(ls -A $(VENV))" ] && [ ! -f $(VENV)/pyvenv.cfg ]; then \
	  echo "VENV=$(VENV) is a directory that is no virtual environment: give another VENV" >&2; \
	  exit 1; fi; \
	$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "PY=$(PY) is not Python 3.10 or newer ($$($(PY) --version 2>&1)): give one, e.g. make PY=python3.11 ..." >&2; \
	  exit 1; }; \
	$(call debian,$(PY) -c "import ensurepip",python3-venv); \
	set -ex; $(PY) -m venv $$([ -f $(VENV)/pyvenv.cfg ] && echo --clear) $(VENV); \
	$(BIN)/pip install --quiet --upgrade pip; touch $@

# onnxruntime and onnxruntime-gpu are one module: the one EXTRAS does not name is removed.
$(STAMP): pyproject.toml | $(CREATED)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	  echo "$(VENV) runs $$($(BIN)/python --version 2>&1); quantgate needs 3.10 or newer: rm -rf $(VENV), then make again with PY=python3.10 or newer" >&2; \
	  exit 1; }
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet "$$(grep -o 'torch==[0-9.]*' pyproject.toml)" --index-url $(TORCH_INDEX))
	@rm -f $(VENV)/.installed-*  # another EXTRAS' stamp says nothing once this one installs
	@$(BIN)/pip uninstall --quiet -y $(if $(findstring gpu,$(EXTRAS)),onnxruntime,onnxruntime-gpu) >/dev/null 2>&1 || true
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# openssl: the TLS tests make their certificates with it.
test-deps:
	@$(call debian,command -v openssl,openssl)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Triton's perf_analyzer (a real KServe client) for the serving tests, into .tools/.
perf-analyzer: $(STAMP)
	PY=$(BIN)/python scripts/get-perf-analyzer.sh

test: test-deps $(STAMP) perf-analyzer
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
	set -e; for b in export quantize reranker qa serve access_log codec grpc_transport; do \
	  echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py; done
	$(BIN)/python bench/gpu_check.py $$(command -v nvidia-smi >/dev/null || echo --quick)

protos: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

clean:
	rm -rf artifacts bundles .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info
