# Every target sets up its own environment, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS ?= models

.PHONY: setup models serve test test-fast lint bench k8s clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The demo models: trained on the built-in synthetic data, exported as version 1.
# Skipped when a version already exists (delete models/<name>/ to rebuild).
models: $(STAMP)
	@test -d $(MODELS)/demo_classifier/1 || $(PY) -m training classifier --data synthetic --model-base $(MODELS) --name demo_classifier --preset demo

serve: models
	@echo "The gateway is not built yet (issue 3); demo models are in $(MODELS)/."

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check training serving tests k8s bench
	$(VENV)/bin/ruff format --check training serving tests k8s bench
	$(VENV)/bin/hadolint Dockerfile
	promtool check rules monitoring/alerts.yml

# Regenerate the kustomize inputs copied from models/ and monitoring/ (one source).
k8s: $(STAMP)
	$(PY) k8s/generate.py

bench: $(STAMP)
	@echo "No benchmarks yet."

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
