# Two commands do everything on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raymia-installed
CONFIG ?= configs/quickstart.yaml

export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
# glibc: keep freed memory in the process (torch's per-step buffers page-faulted in every step otherwise;
# 10x on the NN attack on a 2-core VM): see raymia/allocator.py. The raymia command sets these itself.
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296
export MALLOC_TOP_PAD_ ?= 268435456

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install run test test-all bench ui clean data browser

install: $(STAMP) data browser

data:                   ## Fashion-MNIST from Debian's package (offline), when missing and we are root
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	      echo "could not install dataset-fashion-mnist; Fashion-MNIST audits and tests will say how to get it"; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or set" \
	         "data.data_root to a folder with its four .gz files"; \
	  fi; \
	fi

browser:                ## Debian's headless chromium for the browser tests (Playwright drives it; nothing downloaded)
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium (browser tests)"; \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
	      echo "could not install chromium; the browser tests will be skipped and say why"; \
	  else \
	    echo "chromium is missing: run 'sudo apt-get install chromium' for the browser tests (they skip without it)"; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install            ## audit the quickstart config (digits, local Ray, MLflow in ./mlflow.db)
	$(VENV)/bin/raymia audit $(CONFIG)

test: install           ## the test suite without the long end-to-end runs (pytest reports how many it deselected)
	$(PY) -m pytest -q -m "not slow"
	@echo "(the long end-to-end runs marked slow were deselected: run them with 'make test-all')"

test-all: install       ## every test, the long end-to-end runs included (cluster, claims at scale, DP audits)
	$(PY) -m pytest -q

bench: install          ## time the quickstart by phase
	$(PY) benchmarks/quickstart.py

ui: install             ## browse results: http://127.0.0.1:5000 (runs table: see docs/mlflow.md)
	@echo "open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning, or an experiment in raymia's view:"
	@$(PY) -c "from raymia.tracking import ui_links; print('\\n'.join(ui_links('sqlite:///$(CURDIR)/mlflow.db', 'http://127.0.0.1:5000')))"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --host 127.0.0.1 --port 5000 --workers 1

clean:                  ## remove results (not the venv)
	rm -rf mlflow.db mlartifacts runs
