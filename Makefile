# Every target sets up its own environment, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# tritonclient (the Open Inference Protocol tests' client) needs protobuf<7: its own venv.
CLIENT_VENV := .venv-clients
CLIENT_STAMP := $(CLIENT_VENV)/.installed
MODELS ?= models

.PHONY: setup models demo-versions serve test test-fast lint bench bench-peers k8s docs clean

setup: $(STAMP) $(CLIENT_STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(CLIENT_STAMP): tests/clients/requirements.lock
	$(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLIENT_VENV)/bin/python -m pip install --quiet -r tests/clients/requirements.lock
	touch $(CLIENT_STAMP)

# The demo models: trained on the built-in synthetic data, exported as version 1.
# Version 1 of each is kept in the repository, so on a fresh clone this trains nothing;
# it builds a demo model only where its version 1 is missing.
models: $(STAMP)
	@test -d $(MODELS)/demo_classifier/1 || $(PY) -m training classifier --data synthetic --model-base $(MODELS) --name demo_classifier --preset demo
	@test -d $(MODELS)/demo_detector/1 || $(PY) -m training detector --data synthetic --model-base $(MODELS) --name demo_detector --preset demo

# Retrain the kept demo versions from scratch (about 25 minutes on 2 cores), e.g. after a
# contract change that tests/contract/test_demo_versions.py reports. Calibrated versions
# and label history of the two demo models are deleted with them.
demo-versions: $(STAMP)
	rm -rf $(MODELS)/demo_classifier $(MODELS)/demo_detector
	$(MAKE) models

serve: models
	@url="http://$${IMGSERVE_BIND:-127.0.0.1:8080}"; \
	echo "imgserve gateway on $$url (embedded backend, models in $(MODELS)/)"; \
	echo "  try it in a browser: $$url/   API description: $$url/openapi.json"; \
	echo "  curl -s -F image=@docs/examples/chelsea.jpg $$url/v1/classify"
	IMGSERVE_MODEL_BASE=$(MODELS) $(VENV)/bin/gunicorn -c serving/gunicorn.conf.py 'serving.app:create_app()'

# Two pytest-xdist workers, whole files each (module fixtures and in-file order hold);
# the session's trainings are shared between them (tests/conftest.py: computed_once).
TEST_WORKERS ?= 2

test: $(STAMP) $(CLIENT_STAMP)
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check contract training calibration serving imgserve tests k8s bench
	$(VENV)/bin/ruff format --check contract training calibration serving imgserve tests k8s bench
	$(VENV)/bin/hadolint Dockerfile
	promtool check rules monitoring/alerts.yml

# Regenerate the kustomize inputs copied from models/ and monitoring/ (one source).
k8s: $(STAMP)
	$(PY) k8s/generate.py

# Regenerate the settings reference in docs/operations.md from serving/settings.py.
docs: $(STAMP)
	$(PY) -m serving.settings_reference --write docs/operations.md

bench: models
	$(PY) bench/gateway_bench.py --model-base $(MODELS) --model demo_classifier
	$(PY) bench/drift_acceptance.py --model-base $(MODELS) --name demo_classifier
	$(PY) bench/drift_acceptance.py --model-base $(MODELS) --name demo_detector
	$(PY) bench/calibration_acceptance.py --model-base $(MODELS) --name demo_classifier
	$(PY) bench/detector_calibration.py --model-base $(MODELS) --name demo_detector
	$(PY) bench/real_data.py

# imgserve beside other model servers on the same model (bench/peers/<peer>/, each in
# its own .venv-peers/<peer> from its pinned lock); minutes, not part of `make test`.
bench-peers: $(STAMP) models
	$(PY) bench/peer_bench.py --model-base $(MODELS) --model demo_classifier --json .bench/peers.json

clean:
	rm -rf $(VENV) $(CLIENT_VENV) .pytest_cache .ruff_cache
