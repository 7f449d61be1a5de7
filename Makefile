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
	$(VENV)/bin/ruff check soo_func tests benchmarks notebooks
	OMP_NUM_THREADS=2 $(PY) -m pytest tests

bench: $(VENV)/.stamp-base
	@# Fashion-MNIST for the deep-learning suites (Debian package dataset-fashion-mnist);
	@# without root/apt they fall back to scikit-learn's digits and say so.
	@test -d /usr/share/datasets/fashion-mnist || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "could not apt-get install dataset-fashion-mnist: deep-learning benchmarks use scikit-learn's digits"; \
	else echo "Fashion-MNIST not installed (needs root and apt-get: apt-get install dataset-fashion-mnist); deep-learning benchmarks use scikit-learn's digits"; fi; }
	OMP_NUM_THREADS=2 $(PY) -m benchmarks.run --suite default

lint: $(VENV)/.stamp-base
	$(VENV)/bin/ruff check soo_func tests benchmarks notebooks

clean:
	rm -rf $(VENV)
