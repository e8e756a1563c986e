# juicefs-fsm: `make demo` walks through a local-mode volume, `make test` runs the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser test lint demo diagrams bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

# The live view's tests drive Debian's chromium (playwright downloads no browser): installed
# here when it is missing and this machine can (root with apt-get); without it those tests skip
# (and fail with CI=true).
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the live view's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

test: install browser
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
