"""Fixtures of the gateway tests: model repositories, apps per backend, the TF Serving stand-in.

The model repository holds ``tiny_classifier`` (the really trained one of the
project's ``model_repo`` fixture) and ``tiny_detector`` (``tiny_models``: known
boxes and scores), both exported by ``contract.export.export_model``.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from contract.repository import ModelRepository  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.settings import Settings  # noqa: E402
from tests.serving import tiny_models  # noqa: E402
from tests.serving.tfserving_standin import TFServingStandIn  # noqa: E402

BACKENDS = ("embedded", "tfserving-grpc", "tfserving-rest")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``, read from ``/proc``."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if int(ppid) == pid and state != "Z":
            children.add(int(stat.parent.name))
    return children


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll ``predicate`` every 50 ms until it holds (True) or ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


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


def settings_for(
    backend: str, model_base: Path, standin: TFServingStandIn | None = None, **kw
) -> Settings:
    """Gateway settings for ``backend`` on ``model_base`` (polling off unless asked)."""
    extra = {}
    if standin is not None:
        extra = {"tfserving_grpc": standin.grpc_address, "tfserving_rest": standin.rest_url}
    values = {"model_base": str(model_base), "backend": backend, "poll_interval_s": 3600.0, **extra}
    values.update(kw)
    return Settings.from_env(environ={}, **values)


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
