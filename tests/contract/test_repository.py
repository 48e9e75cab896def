"""Label moves follow TF Serving's rule: serve the version, wait until AVAILABLE, move the label.

The fast tests drive :class:`ModelRepository` with plain readiness callables; the
slow ones run the TF Serving stand-in (real gRPC ``GetModelStatus`` on loopback,
real SavedModels) that refuses a reload whose label points at an unloaded version.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from calibration.errors import LabelError
from calibration.labels import promote, read_label_history, rollback
from contract.repository import (
    READY_GRPC_ENV,
    ModelRepository,
    VersionNotReadyError,
    tfserving_readiness,
)
from tests.helpers import tiny_models

NAME = "m"


def empty_versions(base: Path, *versions: int) -> ModelRepository:
    """A repository whose versions are bare directories: enough for models.config logic."""
    for v in versions:
        (base / NAME / str(v)).mkdir(parents=True)
    return ModelRepository(base, readiness=None)


def test_only_ascii_digit_directories_are_versions(tmp_path):
    # Unicode digits pass str.isdigit(); "²" then fails int(), "٣" would be version 3.
    repo = empty_versions(tmp_path, 1, 2)
    for stray in ("²", "٣", "3a", "tmp"):
        (tmp_path / NAME / stray).mkdir()
    (tmp_path / NAME / "rejected" / "¹").mkdir(parents=True)
    assert repo.versions(NAME) == [1, 2]
    assert repo.next_version(NAME) == 3


def test_a_label_move_is_two_writes_with_the_wait_between(tmp_path):
    repo = empty_versions(tmp_path, 1, 2)
    repo.set_labels(NAME, {"stable": 1})
    seen: list[tuple[list[int], dict[str, int]]] = []

    def ready(name: str, version: int) -> bool:
        # What the server sees while the move waits: v2 requested, stable unmoved.
        seen.append((repo.served_versions(name), repo.labels(name)))
        return len(seen) >= 3  # AVAILABLE on the third look

    repo.readiness, repo.ready_poll_s = ready, 0.01
    repo.set_labels(NAME, {"stable": 2})
    assert seen == [([1, 2], {"stable": 1})] * 3
    assert repo.labels(NAME) == {"stable": 2} and repo.served_versions(NAME) == [1, 2]


def test_a_version_that_never_becomes_available_leaves_the_label(tmp_path):
    repo = empty_versions(tmp_path, 1, 2)
    repo.set_labels(NAME, {"stable": 1})
    repo.readiness, repo.ready_timeout_s, repo.ready_poll_s = (lambda n, v: v == 1), 0.2, 0.02
    start = time.monotonic()
    with pytest.raises(VersionNotReadyError, match="version 2 did not become AVAILABLE"):
        repo.set_labels(NAME, {"stable": 2})
    assert time.monotonic() - start < 5
    assert repo.labels(NAME) == {"stable": 1}
    assert repo.served_versions(NAME) == [1, 2]  # still asked for: a retry finds it loaded


def test_promote_and_rollback_time_out_as_label_errors_without_history(tmp_path):
    repo = empty_versions(tmp_path, 1, 2)
    repo.set_labels(NAME, {"stable": 1})
    with pytest.raises(LabelError, match="did not become AVAILABLE"):
        promote(tmp_path, NAME, 2, readiness=lambda n, v: False, ready_timeout_s=0.1)
    assert repo.labels(NAME) == {"stable": 1} and read_label_history(tmp_path, NAME) == []
    assert promote(tmp_path, NAME, 2, readiness=lambda n, v: True) == 1
    with pytest.raises(LabelError, match="version 1 did not become AVAILABLE"):
        rollback(tmp_path, NAME, readiness=lambda n, v: v != 1, ready_timeout_s=0.1)
    assert repo.labels(NAME) == {"stable": 2}
    assert rollback(tmp_path, NAME, readiness=lambda n, v: True) == (2, 1)


def test_offline_moves_do_not_wait_and_unknown_versions_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(READY_GRPC_ENV, raising=False)
    for v in (1, 2):
        (tmp_path / NAME / str(v)).mkdir(parents=True)
    repo = ModelRepository(tmp_path)  # readiness from the environment: none set
    repo.set_labels(NAME, {"stable": 1})
    repo.set_labels(NAME, {"stable": 2}, keep=1)
    assert repo.labels(NAME) == {"stable": 2} and repo.served_versions(NAME) == [2]
    with pytest.raises(Exception, match="no version 7"):
        repo.set_labels(NAME, {"stable": 7})


# -- against the TF Serving stand-in -------------------------------------------------------
@pytest.fixture
def two_versions(model_repo, tmp_path) -> Path:
    """``tiny_classifier`` v1 labelled stable and served, and v2 on disk but not served."""
    base = tmp_path / "models"
    source = Path(model_repo) / tiny_models.CLASSIFIER / "1"
    for v in (1, 2):
        shutil.copytree(source, base / tiny_models.CLASSIFIER / str(v))
    ModelRepository(base, readiness=None).set_labels(tiny_models.CLASSIFIER, {"stable": 1}, keep=1)
    return base


def single_write(base: Path, label: str, version: int) -> None:
    """Yesterday's move: serve ``version`` and point ``label`` at it in one models.config write."""
    repo = ModelRepository(base, readiness=None)
    config = repo.read_config()
    (entry,) = config.model_config_list.config
    entry.model_version_policy.specific.versions.append(version)
    entry.version_labels[label] = version
    repo.write_config(config)


def serve_only_v1(base: Path) -> None:
    """Back to v1 served and labelled stable, in one write the stand-in accepts."""
    repo = ModelRepository(base, readiness=None)
    config = repo.read_config()
    (entry,) = config.model_config_list.config
    del entry.model_version_policy.specific.versions[:]
    entry.model_version_policy.specific.versions.append(1)
    entry.version_labels.clear()
    entry.version_labels["stable"] = 1
    repo.write_config(config)


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.slow
def test_the_standin_refuses_a_single_write_and_accepts_the_two_writes(two_versions):
    from tests.helpers.tfserving_standin import TFServingStandIn

    name = tiny_models.CLASSIFIER
    server = TFServingStandIn(two_versions, poll_s=0.1).start()
    try:
        manager = server.manager
        assert manager.versions(name) == [1]
        single_write(two_versions, "stable", 2)
        assert wait_for(lambda: manager.rejected), "the single write was not refused"
        assert "version 2 of model tiny_classifier" in manager.rejected[-1]
        assert manager.resolve(name, None, "stable").version == 1  # label kept
        assert manager.versions(name) == [1]  # and the whole reload refused, as ServerCore does

        serve_only_v1(two_versions)
        assert wait_for(lambda: manager.versions(name) == [1])
        refused = len(manager.rejected)
        ready = tfserving_readiness(server.grpc_address)
        assert not ready(name, 2)  # NOT_FOUND over the real gRPC API: not yet
        repo = ModelRepository(two_versions, readiness=ready, ready_timeout_s=30)
        repo.set_labels(name, {"stable": 2})
        assert ready(name, 2)
        assert wait_for(lambda: manager.resolve(name, None, "stable").version == 2)
        assert len(manager.rejected) == refused
    finally:
        server.stop()


@pytest.mark.slow
def test_allow_unavailable_labels_admits_new_labels_only(two_versions):
    from tests.helpers.tfserving_standin import TFServingStandIn

    name = tiny_models.CLASSIFIER
    server = TFServingStandIn(two_versions, allow_unavailable_labels=True).start()
    try:
        manager = server.manager
        single_write(two_versions, "stable", 2)  # moves an existing label: still refused
        manager.reload()
        assert len(manager.rejected) == 1 and manager.versions(name) == [1]
        serve_only_v1(two_versions)
        manager.reload()
        single_write(two_versions, "canary", 2)  # a new label onto an unloaded version
        manager.reload()
        assert len(manager.rejected) == 1
        assert manager.resolve(name, None, "canary").version == 2
    finally:
        server.stop()


def test_tfserving_readiness_says_not_yet_when_nothing_listens():
    ready = tfserving_readiness("127.0.0.1:1", timeout_s=0.5)
    assert ready("anything", 1) is False
