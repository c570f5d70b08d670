# Two entry points: `make demo` (set up, then the CPU demo) and `make test` (set up, then the suite).
# Setup is cached in .venv and redone only when pyproject.toml changes.
# Real SGLang lives in a second venv, .venv-sglang (its pins, e.g. transformers, must not move
# the project's): `make test` builds it for the suite's real-SGLang tier, `make demo-sglang`
# runs the demo against it. Cached like .venv, redone when SGLANG_VERSION changes.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SGLANG_VERSION := 0.5.23
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed-$(SGLANG_VERSION)

# Python >= 3.12 (megatron-core 0.19 needs it): PYTHON=..., else python3.12 / python3.13 on PATH
# (pyenv shims included), else a pyenv-installed 3.12.
find_python = $(shell for c in "$(PYTHON)" python3.12 python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	[ -n "$$c" ] && "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo "$$c"; break; }; done)

.PHONY: setup demo demo-sglang test clean

$(STAMP): pyproject.toml
	@py="$(find_python)"; [ -n "$$py" ] || { echo "error: Python >= 3.12 not found; install it or pass PYTHON=/path/to/python3.12" >&2; exit 1; }; \
	echo "setting up $(VENV) with $$py"; \
	[ -x $(PY) ] || "$$py" -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -e '.[test]' && \
	$(PY) -m pip install -q --no-deps 'verl==0.9.1' && touch $(STAMP)

$(SGLANG_STAMP):
	@py="$(find_python)"; [ -n "$$py" ] || { echo "error: Python >= 3.12 not found; install it or pass PYTHON=/path/to/python3.12" >&2; exit 1; }; \
	echo "setting up $(SGLANG_VENV) (sglang==$(SGLANG_VERSION)) with $$py"; \
	[ -x $(SGLANG_VENV)/bin/python ] || "$$py" -m venv $(SGLANG_VENV); \
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip && \
	$(SGLANG_VENV)/bin/python -m pip install -q 'sglang==$(SGLANG_VERSION)' && touch $(SGLANG_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m examples.cpu_demo $(ARGS)

# The same demo served by real SGLang on CPU (sglang_args.device=cpu; see README).
SGLANG_DEMO_ARGS := engine.backend=sglang engine.sglang_python=$(CURDIR)/$(SGLANG_VENV)/bin/python \
	engine.startup_timeout_s=900 engine.sglang_args.device=cpu engine.sglang_args.max_total_tokens=4096 \
	engine.sglang_args.dtype=float32 engine.sglang_args.load_format=dummy
demo-sglang: $(STAMP) $(SGLANG_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m examples.cpu_demo --run-dir runs/demo-sglang $(SGLANG_DEMO_ARGS) $(ARGS)

# Two xdist workers: the suite's tests wait on process starts (torchrun ranks, Ray, engines) much
# of the time, so a second worker fills a 2-core machine (the one-worker run on CI took 48 min);
# --dist loadgroup keeps each xdist_group (the real-SGLang tier: one ~3 GB server at a time) in one
# worker. --durations=10 reports the ten slowest tests of every run. TEST_WORKERS=N to change it.
TEST_WORKERS ?= 2
test: $(STAMP) $(SGLANG_STAMP)
	OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup \
		--durations=10 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(SGLANG_VENV) runs .pytest_cache
