# Two commands do everything on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raymia-installed
CONFIG ?= configs/quickstart.yaml

export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install run test bench ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install            ## audit the quickstart config (digits, local Ray, MLflow in ./mlflow.db)
	$(VENV)/bin/raymia audit $(CONFIG)

test: install           ## the whole test suite
	$(PY) -m pytest -q

bench: install          ## time the quickstart by phase
	$(PY) benchmarks/quickstart.py

ui: install             ## browse results: http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:                  ## remove results (not the venv)
	rm -rf mlflow.db mlartifacts runs
