# Two commands do everything on a fresh machine (Python 3.11, no broker running):
#   make demo   - the shop demo on an embedded nats-server
#   make test   - lint, type-check and the whole test suite against a real nats-server
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test lint bench clean

$(BIN)/jetpool: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/jetpool

demo: install
	$(BIN)/jetpool run -c config/shop.yaml

lint: install
	$(BIN)/ruff check engine handlers tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/pytest benchmarks --benchmark-only -p no:cacheprovider -s

clean:
	rm -rf $(VENV) .jetpool .pytest_cache .mypy_cache .ruff_cache
