# Two entry points for a fresh machine: `make demo` (the whole pipeline on a tiny setting) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

.PHONY: setup test test-fast demo bench
setup: $(VENV)/.installed

# Test files run in parallel, one file per worker (module fixtures are built once); the 15 slowest tests are listed.
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow"

demo: $(VENV)/.installed
	$(PY) demo.py

# Training steps, sampling, data throughput, step memory and the evaluation during training on a configuration sized
# for a CPU; flags: bench/*.py --help.
bench: $(VENV)/.installed
	$(PY) bench/bench_step.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_data.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_eval.py
