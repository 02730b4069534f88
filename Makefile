# Two commands do everything on a fresh machine (Python 3.11, no broker running):
#   make demo   - the shop demo on an embedded nats-server
#   make test   - lint, type-check and the whole test suite against a real nats-server
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test lint bench bench-tools clean fastpath-latest

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

# Two test processes (pytest-xdist): most tests wait on real servers and processes, so two share the two
# cores well (the whole suite takes about half the time of one process). Every fixture is per test or per
# xdist worker (ports, temp dirs, the session's nats-server and PostgreSQL), so tests never share a server.
# A test file stays in one process (--dist loadfile): its module fixtures (a running shop) are built once.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# wrk (Debian's), the HTTP load tool of the shop's e2e benchmark (benchmarks/shop_http.py), when missing.
bench-tools:
	@command -v wrk >/dev/null || (apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null))

bench: install bench-tools
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/pytest benchmarks --benchmark-only -p no:cacheprovider -s

# The fast-path tests (engine/transport) against the newest nats-py the package index serves, in a
# throwaway venv layered over this one (only nats-py differs; nats-server from this venv); not part of `make test`. A release
# outside engine/transport/fence.py's SUPPORTED range falls back, and these tests say so: see docs/nats-py.md.
FASTPATH_TESTS := tests/engine/unit/test_parser.py tests/engine/unit/test_fast_path_fence.py \
                  tests/engine/integration/test_parser.py tests/engine/integration/test_inbox.py \
                  tests/engine/integration/test_outbox.py tests/engine/integration/test_fast_path_metric.py

fastpath-latest: install
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(BIN)/python -m venv "$$tmp" && \
	  echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
	    > "$$("$$tmp/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/jetpool-venv.pth" && \
	  "$$tmp/bin/python" -m pip install --quiet --disable-pip-version-check --ignore-installed --upgrade nats-py && \
	  "$$tmp/bin/python" -c 'import nats; from importlib.metadata import version; from engine.transport import fence; \
	    v = version("nats-py"); print("nats-py", v, "from", nats.__path__[0], "- fence:", fence.fallback_reason("outbox", v) or "supported")' && \
	  PATH="$(CURDIR)/$(BIN):$$PATH" "$$tmp/bin/python" -m pytest -p no:cacheprovider -q $(FASTPATH_TESTS)

clean:
	rm -rf $(VENV) .jetpool .pytest_cache .mypy_cache .ruff_cache
