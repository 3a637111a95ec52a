# Two commands do all the set-up: `make run` (the main job) and `make test` (the suite).
# Both create .venv when missing and (re)install only when pyproject.toml changed (install stamp).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mcdm-install-stamp
TEST_STAMP := $(VENV)/.mcdm-test-install-stamp
PYTEST_ARGS ?=
# stages call `mcdm`, `dvc`, `deepspeed` from the venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
# OpenMP threads sleep instead of spinning while they wait (see src/mcdm/__init__.py)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test install browser params-default params-micro params-paper clean-venv

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

# the test extra (pytest, selenium): only what the suite needs, not a runtime dependency
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

## the main job: the whole DVC pipeline on the embedded default (sample data, tiny models, CPU)
run: install
	$(VENV)/bin/dvc repro

## the test suite (pytest exit 5, "no tests collected", is not a failure)
test: $(TEST_STAMP) browser
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

params-default params-micro params-paper: install
	$(VENV)/bin/mcdm params apply $(subst params-,,$@)

clean-venv:
	rm -rf $(VENV)

# ---- services on 127.0.0.1, each with a pid file and a log under run/; stopped by those pids only ----
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
RUN_DIR := run

.PHONY: prefect-up prefect-down mlflow-ui mlflow-down

prefect-up: install
	@mkdir -p $(RUN_DIR) .prefect
	@$(PY) -m mcdm.services start prefect-server --port $(PREFECT_PORT) --run-dir $(RUN_DIR)
	@$(PY) -m mcdm.services start prefect-serve --port $(PREFECT_PORT) --run-dir $(RUN_DIR)

prefect-down:
	@$(PY) -m mcdm.services stop prefect-serve --run-dir $(RUN_DIR)
	@$(PY) -m mcdm.services stop prefect-server --run-dir $(RUN_DIR)

mlflow-ui: install
	@mkdir -p $(RUN_DIR)
	@$(PY) -m mcdm.services start mlflow-ui --port $(MLFLOW_PORT) --run-dir $(RUN_DIR)

mlflow-down:
	@$(PY) -m mcdm.services stop mlflow-ui --run-dir $(RUN_DIR)

## Debian's chromium + chromedriver for the browser tests (the web demo, the MLflow UI): installed only
## when running as root with apt-get; elsewhere those tests skip and say why. The core set-up needs only pip.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium + chromium-driver (apt-get) for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	      >/dev/null 2>&1 || echo "browser install failed: the browser tests will skip"; \
	  else echo "not root or no apt-get: the browser tests will skip"; fi; \
	fi
