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

# Tests run in parallel, one worker per core, an idle worker taking tests from a busy one's queue (the heavy
# fixtures live for the session); the 15 slowest tests are listed.
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto --dist worksteal --durations=15

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow"

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
