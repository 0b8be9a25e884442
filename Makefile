# The two commands a newcomer needs: `make pipeline` and `make test` (each sets up first if needed).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.setup-stamp
PROFILE ?= smoke

.PHONY: setup pipeline test clean-artifacts

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

pipeline: setup
	$(VENV)/bin/s2s flow data --profile $(PROFILE)

test: setup
	$(VENV)/bin/python -m pytest

clean-artifacts:
	rm -rf artifacts
