# Two commands do everything on a fresh clone: `make test` and `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WHEELS := $(wildcard /opt/wheels)
PIP_FLAGS := -q -c constraints.txt $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: test bench lint clean

$(VENV)/.stamp-base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) "torch==2.13.0"
	$(PIP) install $(PIP_FLAGS) -e ".[test,bench]"
	touch $@

test: $(VENV)/.stamp-base
	$(VENV)/bin/ruff check soo_func tests benchmarks
	OMP_NUM_THREADS=2 $(PY) -m pytest tests

bench: $(VENV)/.stamp-base
	OMP_NUM_THREADS=2 $(PY) -m benchmarks.run --suite default

lint: $(VENV)/.stamp-base
	$(VENV)/bin/ruff check soo_func tests benchmarks

clean:
	rm -rf $(VENV)
