# `make run` and `make test` work on a fresh machine: each creates .venv if missing and installs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian's packages that tests run: headless Chromium (tests/test_browser.py) and Prometheus 2.42 (tests/test_prometheus.py)
DEBIAN_TOOLS := /usr/bin/chromium /usr/bin/prometheus

.PHONY: run test bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m app

# installed once, together (a grouped target: one apt-get for both; CI runs as root on a fresh machine)
$(DEBIAN_TOOLS) &:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium prometheus >/dev/null

test: $(STAMP) $(DEBIAN_TOOLS)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m loadtest.bench_rest --concurrency 8 --rounds 2 --plot loadtest/results/bench_rest.png
