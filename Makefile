# Quick start: `make demo` then `make test`. Both create/reuse .venv.
# torch is pinned to the CPU build first: a bare `torch>=2.4` would pull a multi-GB CUDA wheel.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/domainmix demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2 || [ $$? -eq 5 ]

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/sampler_throughput.py --json

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
