# The two commands a newcomer needs: `make pipeline` and `make test` (each sets up first if needed;
# `make test` first checks the layer rules with import-linter, pyproject.toml [tool.importlinter]).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.setup-stamp
PROFILE ?= smoke

.PHONY: setup pipeline test ui clean-artifacts

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

pipeline: setup
	$(VENV)/bin/s2s flow pipeline --profile $(PROFILE)

ui: setup
	bash scripts/ui.sh

test: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest

clean-artifacts:
	rm -rf artifacts
