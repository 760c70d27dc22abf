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

# Debian packages the tests need: promtool (`prometheus`) for the metrics/config checks, wrk for the load
# benchmarks, the PostgreSQL server binaries (`postgresql`: initdb/pg_ctl in /usr/lib/postgresql/*/bin) for the
# audit-store tests, which start a throwaway server of their own, chromium for the browser tests
# (tests/e2e/test_audit_page.py drives Debian's chromium through Playwright, no browser download), and g++ for
# the compiled serving form (AOTInductor compiles C++: tests/integration/test_compile.py).
system-deps:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "install Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; fi

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

# The demo model that `make serve` serves: CBAM resnet20 on cluttered-mnist (48x48), 2 CPU processes
# (torchrun, gloo, one thread each), Macula's init (docs/results.md: the authors' init did not do better
# here), then the temperature and unfamiliar-input detector (training.calibration). About 8 minutes on
# 2 idle cores.
DEMO_OUT ?= runs/demo
demo-model: install
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m training --arch resnet20 --attention cbam \
	  --dataset cluttered-mnist --canvas-size 48 --clutter 4 --epochs 15 --batch-size 64 --lr 0.1 \
	  --warmup-epochs 1 --init macula --workers 0 --out $(DEMO_OUT)
	mkdir -p model_store
	cp $(DEMO_OUT)/model.safetensors model_store/demo.safetensors
	cp $(DEMO_OUT)/metrics.json model_store/demo.metrics.json

# Plain vs BAM vs CBAM on two cluttered-mnist tasks, 3 seeds, both inits on the first (docs/results.md):
# 24 runs, about 4 hours on 2 idle cores: the first task one 2-process run at a time, the hard one two
# 1-process runs side by side. Finished runs are kept and not trained again.
study: install
	nice -n 10 $(PY) -m training.study --out runs/study --tasks mnist48
	nice -n 10 $(PY) -m training.study --out runs/study --tasks hard --jobs 2
	$(PY) -m training.study --out runs/study --report

# Serving benchmark: raw limit, naive FastAPI, LitServe, TorchServe and Macula (docs/benchmarks.md).
bench: install system-deps
	$(PY) -m bench.run_serving
