# Postroom — the two commands a newcomer needs:
#   make run    set up and start Postroom on the embedded default
#   make test   set up and run the whole test suite (pytest + ruff + mypy strict)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv test lint typecheck pytest run clean

$(BIN)/postroom: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(BIN)/postroom

pytest: venv
	$(BIN)/pytest -q

LINTED := worker tests $(wildcard bench)

lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: venv
	$(BIN)/mypy

test: lint typecheck pytest

run: venv
	$(BIN)/postroom up

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache
