# Two commands on a fresh machine: `make run` (set up, then the quickstart) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
OUT ?= results/quickstart

.PHONY: run test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/fedbench sweep sweeps/quickstart.yaml --out $(OUT)
	@echo "report: $(abspath $(OUT))/report.html (open it in a browser)"

test: $(BIN)/.installed
	$(BIN)/python -m pytest

test-fast: $(BIN)/.installed   # without the slow end-to-end tests (clusters, object store, reruns)
	$(BIN)/python -m pytest -m "not slow"

bench: $(BIN)/.installed
	$(BIN)/fedbench bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
