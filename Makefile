# Quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(BASE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BASE_STAMP)
	$(PY) -m pcdistill demo

# one thread per xdist worker, so that two workers do not oversubscribe 2 cores
test: $(TEST_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: $(BASE_STAMP)
	$(PY) bench/loss_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
