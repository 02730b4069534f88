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

# promtool (Prometheus' checker, used by the metrics and dashboard tests) from Debian's package,
# unpacked into the venv without installing the Prometheus server.
$(BIN)/promtool: | $(BIN)/jetpool
	@tmp=$$(mktemp -d) && cd $$tmp && \
	  (apt-get download prometheus >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null)) && \
	  dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$(BIN)/promtool && rm -rf $$tmp

install: $(BIN)/jetpool $(BIN)/promtool

demo: install
	$(BIN)/jetpool demo

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
