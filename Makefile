# juicefs-fsm: `make demo` walks through a local-mode volume, `make test` runs the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo diagrams bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -ra

lint: install
	$(VENV)/bin/ruff check fsm tests bench
	$(VENV)/bin/mypy

demo: install
	$(PY) -m fsm demo

diagrams: install
	$(PY) -m fsm.diagram --write diagrams/

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
