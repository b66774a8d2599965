# emloop — the two commands: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO ?= demo_project
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test venv bench clean-demo help

help:
	@echo "make demo   - install into .venv, build the synthetic demo project, run the loop, open the dashboard"
	@echo "make test   - install into .venv if needed and run the test suite"
	@echo "make bench  - run the benchmarks in bench/ (writes bench/results/*.json)"

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (set PY=/path/to/python3.11)"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m launch.demo --project $(DEMO) $(DEMO_ARGS)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	for b in $(filter-out bench/loop_variants.py,$(wildcard bench/*.py)); do PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python $$b || exit 1; done

clean-demo:
	rm -rf $(DEMO)
