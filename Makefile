# Entry points: `make demo`, `make gpt-demo` (four peers train the tiny GPT, then print a sample), `make test` (fast tier: unit, in-process and `smoke` tests, not `slow`)
# and `make test-all` (every tier). Each creates .venv when missing. pytest exits 5 when it
# collected no tests; make fails on it like on any other non-zero exit.
# torch==2.13.0 is installed first when no torch is present: it is a CPU build served from
# the local wheel cache; an open range would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.p2pdl-installed
# glibc allocator settings for processes that churn 20-50 MB buffers; see p2pdl/_malloc.py.
MALLOC_ENV := MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824

.PHONY: demo gpt-demo test test-all install lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(MALLOC_ENV) $(PY) scripts/local_cluster.py configs/ring4.toml --out runs/demo

gpt-demo: $(STAMP)
	$(MALLOC_ENV) $(PY) scripts/local_cluster.py configs/gpt_tiny_allreduce4.toml --steps 120 --out runs/gpt-demo

test: $(STAMP)
	$(MALLOC_ENV) $(PY) -m pytest -m "not slow"

test-all: $(STAMP)
	$(MALLOC_ENV) $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check p2pdl peers scripts benchmarks tests
	$(VENV)/bin/ruff format --check p2pdl peers scripts benchmarks tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
