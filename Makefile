# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
# torch is pinned to the release this project is tested with; on a CUDA machine the same pin installs the
# CUDA build from PyPI.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.interlayer-installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,test]' torch==2.13.0
	touch $(STAMP)

.PHONY: demo test lint bench
demo: $(STAMP)
	$(VENV)/bin/interlayer demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check interlayer tests benchmarks
	$(VENV)/bin/ruff format --check interlayer tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,test,bench]' torch==2.13.0
	$(PY) benchmarks/sae_train.py
	$(PY) benchmarks/capture_overhead.py
	$(PY) benchmarks/zoo.py
