# Two commands do all the set-up: `make run` (the main job) and `make test` (the suite).
# Both create .venv when missing and (re)install only when pyproject.toml changed (install stamp).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mcdm-install-stamp
PYTEST_ARGS ?=
# stages call `mcdm`, `dvc`, `deepspeed` from the venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test install params-default params-micro params-paper clean-venv

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

install: $(STAMP)

## the main job: the whole DVC pipeline on the embedded default (sample data, tiny models, CPU)
run: install
	$(VENV)/bin/dvc repro

## the test suite (pytest exit 5, "no tests collected", is not a failure)
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

params-default params-micro params-paper: install
	$(VENV)/bin/mcdm params apply $(subst params-,,$@)

clean-venv:
	rm -rf $(VENV)
