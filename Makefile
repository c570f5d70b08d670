# Two entry points: `make demo` (set up, then the CPU demo) and `make test` (set up, then the suite).
# Setup is cached in .venv and redone only when pyproject.toml changes.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Python >= 3.12 (megatron-core 0.19 needs it): PYTHON=..., else python3.12 / python3.13 on PATH
# (pyenv shims included), else a pyenv-installed 3.12.
find_python = $(shell for c in "$(PYTHON)" python3.12 python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	[ -n "$$c" ] && "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo "$$c"; break; }; done)

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	@py="$(find_python)"; [ -n "$$py" ] || { echo "error: Python >= 3.12 not found; install it or pass PYTHON=/path/to/python3.12" >&2; exit 1; }; \
	echo "setting up $(VENV) with $$py"; \
	[ -x $(PY) ] || "$$py" -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -e '.[test]' && \
	$(PY) -m pip install -q --no-deps 'verl==0.9.1' && touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m examples.cpu_demo $(ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
