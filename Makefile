# The two commands: `make demo` and `make test`. Each does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test lint crds manifests control-plane clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,workloads]'
	touch $(STAMP)

control-plane: $(STAMP)
	$(BIN)/python -c "from fireflyer.dev.build import ensure_binaries; ensure_binaries()"

demo: control-plane
	$(BIN)/fireflyer demo

test: control-plane
	$(BIN)/ruff check fireflyer tests bench
	$(BIN)/mypy
	$(BIN)/fireflyer crds --check
	$(BIN)/fireflyer manifests --check
	$(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check fireflyer tests bench
	$(BIN)/mypy

crds: $(STAMP)
	$(BIN)/fireflyer crds

manifests: control-plane
	$(BIN)/fireflyer manifests

clean:
	rm -rf $(VENV) .fireflyer
