# The same commands CI runs (.ci/run calls `make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test unit lint typecheck services slow bench bench-mariadb bench-cpu bench-overhead clean

# numbering alone (what the quick start runs), and numbering with every extra the checks use.
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev

$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench,examples,mysql,django]'
	touch $@ $(BASE)

install: $(DEV) ## Create .venv and install numbering with its test, bench and example tools.

demo: $(BASE) ## The quick start: install numbering alone, run `numbering demo` (no server needed).
	$(BIN)/numbering demo

services: ## Start PostgreSQL and Redis on this machine if they are down.
	./scripts/services.sh

lint: install ## ruff and mypy.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	./scripts/typecheck.sh $(BIN)/mypy

test: install services lint ## Everything CI runs: lint, types, unit, integration, acceptance.
	$(BIN)/pytest

unit: install ## The tests that need no server.
	$(BIN)/pytest tests/unit

slow: install services ## The random fault soak, excluded from `make test` (prints its result).
	$(BIN)/pytest -m slow -s

bench: install services ## numbering against the alternatives on PostgreSQL, then on MariaDB; writes docs/benchmarks.md and docs/benchmarks-mariadb.md (about 25 minutes on 2 cores).
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.mariadb

bench-mariadb: install services ## The MariaDB part of `make bench` alone: writes docs/benchmarks-mariadb.md (about 5 minutes).
	$(BIN)/python -m benchmarks.mariadb

bench-cpu: install services ## CPU ms per number by process (requesters, worker, PostgreSQL, Redis) at 16 requesters, beside django-sequences and a Celery no-op.
	$(BIN)/python -m benchmarks.cpu

bench-overhead: install services ## CPU and wall ms of numbering's own transaction against the same SQL on bare psycopg2.
	$(BIN)/python -m benchmarks.overhead

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache numbering.db*
