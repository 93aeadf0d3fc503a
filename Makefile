# tallyflow — `make run` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)

.PHONY: install browser run test bench bench-scaling bench-quix clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml operators/_fastintake.c operators/_fastlive.c state/_fastheld.c state/_fastwindows.c sinks/_fastresp.c sinks/_fastcolumns.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	touch $@

# Headless Chromium for the status-page test (Debian's package; skipped there if it cannot install).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "chromium missing and not root: the status-page test will skip (fail under CI=true)"; exit 0; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

run: install
	$(PY) -m deploy.demo

test: install browser
	$(PY) -m pytest

bench: install
	$(PY) -m deploy.bench

# Clusters of 1, 2, 4... one-worker processes up to the cores, ClickHouse writes discarded.
bench-scaling: install
	$(PY) -m deploy.bench --scaling --no-latency

bench-quix: install
	test -x .venv-quix/bin/python || $(PYTHON) -m venv .venv-quix
	.venv-quix/bin/pip install --quiet quixstreams==3.28.1
	$(PY) -m deploy.bench

clean:
	rm -rf var .pytest_cache
