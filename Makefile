PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint format run clean locales bench chaos

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=python3.x (3.11 or newer)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP)

demo: $(STAMP)
	$(BIN)/conveyor demo

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -n 4

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Performance figures against their baselines; prints a table, writes bench/results.json.
bench: $(DEV_STAMP)
	$(BIN)/python -m bench

# The fault suite: one line per fault class; writes bench/chaos-results.json.
chaos: $(DEV_STAMP)
	$(BIN)/python -m chaos

run: $(STAMP)
	$(BIN)/conveyor run

clean:
	rm -rf $(VENV) .pytest_cache

# Re-extract user-visible strings from templates and code and merge them into the catalogs.
locales: $(DEV_STAMP)
	$(BIN)/pybabel extract -F babel.cfg -o locales/messages.pot --no-location --omit-header .
	$(BIN)/pybabel update -i locales/messages.pot -d locales -D messages --no-fuzzy-matching
