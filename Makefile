# Macula — `make serve` runs the service on the committed demo model, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install system-deps test test-fast serve lint demo-model study bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

# promtool (Debian `prometheus`) for the metrics/config checks, wrk for the load benchmarks.
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v wrk >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus wrk >/dev/null; \
	  else echo "install Debian packages 'prometheus' and 'wrk' (sudo apt-get install prometheus wrk)"; exit 1; fi; fi

test: install system-deps
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not e2e"

serve: install
	$(PY) -m service --model-dir model_store --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
