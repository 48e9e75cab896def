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
	@test -d $(MODELS)/demo_detector/1 || $(PY) -m training detector --data synthetic --model-base $(MODELS) --name demo_detector --preset demo

serve: models
	@echo "imgserve gateway on http://$${IMGSERVE_BIND:-127.0.0.1:8080} (embedded backend, models in $(MODELS)/)"
	@echo "  curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @photo.jpg http://127.0.0.1:8080/v1/classify"
	@echo "  curl -s http://127.0.0.1:8080/v1/models ; API description: http://127.0.0.1:8080/openapi.json"
	IMGSERVE_MODEL_BASE=$(MODELS) $(VENV)/bin/gunicorn -c serving/gunicorn.conf.py 'serving.app:create_app()'

# Two pytest-xdist workers, whole files each (module fixtures and in-file order hold);
# the session's trainings are shared between them (tests/conftest.py: computed_once).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check contract training calibration serving tests k8s bench
	$(VENV)/bin/ruff format --check contract training calibration serving tests k8s bench
	$(VENV)/bin/hadolint Dockerfile
	promtool check rules monitoring/alerts.yml

# Regenerate the kustomize inputs copied from models/ and monitoring/ (one source).
k8s: $(STAMP)
	$(PY) k8s/generate.py

bench: models
	$(PY) bench/gateway_bench.py --model-base $(MODELS) --model demo_classifier
	$(PY) bench/drift_acceptance.py --model-base $(MODELS) --name demo_classifier
	$(PY) bench/drift_acceptance.py --model-base $(MODELS) --name demo_detector
	$(PY) bench/calibration_acceptance.py --model-base $(MODELS) --name demo_classifier
	$(PY) bench/detector_calibration.py --model-base $(MODELS) --name demo_detector
	$(PY) bench/real_data.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
