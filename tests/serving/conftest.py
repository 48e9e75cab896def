"""Fixtures of the gateway tests: model repositories, apps per backend, the TF Serving stand-in.

The model repository holds ``tiny_classifier`` (the really trained one of the
project's ``model_repo`` fixture) and ``tiny_detector`` (``tiny_models``: known
boxes and scores), both exported by ``contract.export.export_model``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from contract.repository import ModelRepository  # noqa: E402
from serving.app import create_app  # noqa: E402
from tests.helpers import tiny_models  # noqa: E402
from tests.helpers.gateway import settings_for  # noqa: E402
from tests.helpers.tfserving_standin import TFServingStandIn  # noqa: E402

BACKENDS = ("embedded", "tfserving-grpc", "tfserving-rest")


@pytest.fixture(scope="session")
def serving_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base with ``tiny_classifier`` v1 and ``tiny_detector`` v1, both labelled stable."""
    base = tmp_path_factory.mktemp("serving_models")
    project = Path(request.getfixturevalue("model_repo"))
    shutil.copytree(project / tiny_models.CLASSIFIER / "1", base / tiny_models.CLASSIFIER / "1")
    ModelRepository(base).set_labels(tiny_models.CLASSIFIER, {"stable": 1})
    tiny_models.export_detector(base)
    return base


@pytest.fixture
def mutable_repo(serving_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the repository for tests that publish or retire versions."""
    target = tmp_path / "models"
    shutil.copytree(serving_repo, target, ignore=shutil.ignore_patterns(".lock"))
    return target


@pytest.fixture(scope="session")
def standin(serving_repo: Path) -> Iterator[TFServingStandIn]:
    """The TF Serving stand-in on loopback, serving ``serving_repo``."""
    server = TFServingStandIn(serving_repo).start()
    yield server
    server.stop()


@pytest.fixture
def healthy_standin(standin: TFServingStandIn) -> Iterator[TFServingStandIn]:
    """The shared stand-in with its failure knobs reset after the test."""
    yield standin
    standin.delay_s = 0.0
    standin.fail = None


@pytest.fixture(scope="module", params=BACKENDS)
def backend_app(request: pytest.FixtureRequest, serving_repo: Path, standin: TFServingStandIn):
    """A gateway app per backend (module scope: models load once per module and backend)."""
    app = create_app(settings_for(request.param, serving_repo, standin))
    yield app
    app.extensions["imgserve"].close()


@pytest.fixture(scope="module")
def embedded_app(serving_repo: Path):
    """A gateway app on the embedded backend."""
    app = create_app(settings_for("embedded", serving_repo))
    yield app
    app.extensions["imgserve"].close()


@pytest.fixture
def client(embedded_app):
    return embedded_app.test_client()
