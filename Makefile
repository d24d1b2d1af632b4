# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test services lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

## The main job on the embedded default: SQLite + the bundled demo practice.
demo: $(STAMP)
	$(VENV)/bin/oprecon demo

## Lint and types, then the whole test suite against the local Redis and PostgreSQL
## (started if down).
test: $(STAMP) services lint
	$(VENV)/bin/pytest -q

services:
	@bash scripts/ensure-services.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check worker tasks config tests bench
	$(VENV)/bin/mypy worker tasks config

bench: $(STAMP) services
	$(VENV)/bin/oprecon bench --patients 10000

clean:
	rm -rf $(VENV) var .pytest_cache
