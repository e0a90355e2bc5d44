# `make run` / `make test` do all the set-up on a fresh machine (only Python needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch (a local file on the project's machines); set TORCH_SPEC="torch" for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
RUN_CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: install run test test-fast clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) main.py fit --config $(RUN_CONFIG)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
