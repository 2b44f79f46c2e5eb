# Quick start: `make demo` then `make test`. Both create/reuse .venv.
# torch is pinned first: a bare `torch>=2.4` would pull whatever build the index serves. A local
# wheelhouse may serve the CPU wheel for the plain pin; PyPI's Linux wheel is the multi-GB CUDA build, so
# there ask for the CPU one: make demo TORCH_PIP_FLAGS='--index-url https://download.pytorch.org/whl/cpu'
TORCH_PIP_FLAGS ?=
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
PEERS_STAMP := $(VENV)/.peers-installed

.PHONY: demo test test-slow reproduce lint bench bench-peers clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install $(TORCH_PIP_FLAGS) torch==2.13.0
	$(PIP) install -e '.[test]'
	touch $(STAMP)

# Salmani et al. Fig. 1d-f: linear regression, uniform vs FGLS vs VA vs FGLS+VA, 5 seeds (about 2 min).
demo: $(STAMP)
	$(VENV)/bin/domainmix run linear --setting fig1def --methods uniform,fgls,va,fgls+va --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2 || [ $$? -eq 5 ]

# Every experiment of docs/reproduction.md (about 40 min on 2 cores).
reproduce: $(STAMP)
	for s in fig1abc fig1def fig4abc fig4def; do $(VENV)/bin/domainmix run linear --setting $$s --out runs/linear-$$s || exit 1; done
	for s in fig2abc fig2def; do $(VENV)/bin/domainmix run logistic --setting $$s --out runs/logistic-$$s || exit 1; done
	$(VENV)/bin/domainmix run mlp --out runs/mlp

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy  # strict, on src/domainmix except experiments/ ([tool.mypy] in pyproject.toml)

bench: $(STAMP)
	$(PY) benchmarks/sampler_throughput.py --json > benchmarks/results/sampler_throughput.json.tmp
	mv benchmarks/results/sampler_throughput.json.tmp benchmarks/results/sampler_throughput.json
	cat benchmarks/results/sampler_throughput.json

$(PEERS_STAMP): $(PY) pyproject.toml
	$(PIP) install $(TORCH_PIP_FLAGS) torch==2.13.0
	$(PIP) install -e '.[peers]'
	touch $(PEERS_STAMP)

# domainmix against torch, torchdata, HF datasets, lhotse and Megatron-Core (about 1 min): JSON, then the page.
bench-peers: $(PEERS_STAMP)
	$(PY) benchmarks/peers.py --json --out benchmarks/results/peers.json
	$(PY) benchmarks/peers_report.py --json benchmarks/results/peers.json --out docs/benchmarks.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
