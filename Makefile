# Two entry points: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this project's machines; elsewhere this pin pulls the
# default build for your platform. Override with `make TORCH=torch==2.5.1 ...`.
TORCH ?= torch==2.13.0

.PHONY: run test lint venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/sparsefit run --overwrite

# One test process per core (pytest-xdist), each test file on one of them so that its shared fixtures (a loaded
# model, a pruned run) are built once; tests/conftest.py gives each process one thread and fails a test over 60 s.
test: venv
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q -n auto --dist loadfile

lint: venv
	$(VENV)/bin/ruff check src tests bench
