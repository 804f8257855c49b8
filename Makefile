# pytest-memleak-ebpf — all set-up is done by these targets, idempotently.
#   make demo   set up, then run the plugin on example_project and show the leak report
#   make test   set up, then run the test suite (what .ci/run runs)
#   make bench  set up, then run the benchmarks (bench/README.md)
#   make bench-kinds  set up, then the leak-kinds benchmark (bench/kinds.py, bench/README.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system venv demo test unit bench bench-kinds clean

setup: system venv

system:
	@bash scripts/setup-system.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: setup
	@$(MAKE) -s -C example_project PYTHON=$(abspath $(PY))
	@echo "== pytest --ebpf-leaks on example_project (one test is over its budget on purpose)"
	@cd example_project && ../$(PY) -m pytest --ebpf-leaks --junitxml=build/junit.xml \
	    --ebpf-leaks-json=build/leaks.json -p no:cacheprovider; rc=$$?; \
	  echo; echo "JUnit XML: example_project/build/junit.xml   JSON: example_project/build/leaks.json"; \
	  if [ $$rc -eq 1 ]; then echo "demo: the over-budget test failed as intended"; exit 0; fi; \
	  echo "demo: unexpected pytest exit status $$rc"; exit 1

test: setup
	@bash scripts/run-tests.sh

unit: venv
	@$(PY) -m pytest tests -m "not ebpf" -q

bench: setup
	@$(PY) bench/run.py

bench-kinds: setup
	@$(PY) bench/kinds.py

clean:
	rm -rf $(VENV) example_project/build tests/fixtures/build bench/out
