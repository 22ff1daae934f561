# Two commands on a fresh machine: `make run` (set up, then the quickstart) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
OUT ?= results/quickstart

.PHONY: run test test-fast bench scale clean

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

scale: $(BIN)/.installed   # the scale figures of README (results/scale): 10^3..10^7 clients, FedAvg and FedLPS
	for n in 1000 10000 100000 1000000 10000000; do for m in fedavg fedlps; do \
	  $(BIN)/fedbench bench --workload synthetic --clients $$n --clients-per-round 100 --rounds 10 --method $$m --json \
	    > results/scale/synthetic_$${n}_$$m.json || exit 1; done; done
	$(BIN)/python -m harness.bench plot results/scale
	$(BIN)/python -m harness.bench table results/scale

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
