"""The TF Serving model repository on disk: versions, ``models.config``, labels.

Layout (see the design's "model repository" contract)::

    <base>/models.config                ModelServerConfig text proto
    <base>/<name>/<version>/            SavedModel, published atomically
    <base>/<name>/.staging-*/           work in progress, never a number

A version appears by ``os.rename`` of a finished staging directory, so TF Serving
and the gateway, which poll the base path, never see half a model. Every write of
``models.config`` is also write-then-rename.

Label moves follow TF Serving's rule: a label may only point at a version that is
loaded and AVAILABLE (``--allow_version_labels_for_unavailable_models`` lets a *new*
label point at an unloaded version at start-up, never moves an existing one; a
reload that breaks the rule is refused whole). So :meth:`ModelRepository.set_labels`
writes twice: (a) add the versions to the ``specific`` policy, (b) wait until the
repository's :data:`ReadinessCheck` reports them AVAILABLE, (c) move the labels.
The check is chosen by whoever opens the repository: :func:`tfserving_readiness`
(``GetModelStatus`` over gRPC) in front of TF Serving, any ``(name, version) ->
bool`` (the gateway's own catalog when it serves the repository in-process), or
``None`` offline (``make models``, no server reads the repository yet): then (b)
does not wait. Left unset, it comes from the environment: ``IMGSERVE_LABEL_READY_GRPC``
(a TF Serving gRPC address) selects :func:`tfserving_readiness`, so the command
line (``python -m training export|calibrate|promote|rollback``) and calibration
jobs next to TF Serving wait without a new flag; unset means do not wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

CONFIG_FILE = "models.config"
#: Where TF Serving sees the repository inside its container (base_path prefix).
SERVING_ROOT = "/models"
#: How long a label move waits for its version to become AVAILABLE by default: a
#: cold GPU load of a MobileNetV2 plus its warm-up requests takes seconds, not minutes.
DEFAULT_READY_TIMEOUT_S = 120.0

#: ``ready(name, version)``: is this version loaded and AVAILABLE on the serving side?
ReadinessCheck = Callable[[str, int], bool]
#: TF Serving gRPC address (host:port) label moves wait on when no check is passed.
READY_GRPC_ENV = "IMGSERVE_LABEL_READY_GRPC"
#: ``readiness=FROM_ENV``: decide from :data:`READY_GRPC_ENV` at the first label move.
FROM_ENV = "env"


def is_version_name(name: str) -> bool:
    """A version directory's name: ASCII digits, as TF Serving reads them ("²" and
    "٣" are Unicode digits that are not versions)."""
    return name.isascii() and name.isdigit()


class RepositoryError(RuntimeError):
    """A model repository operation that cannot be done as asked."""


class VersionNotReadyError(RepositoryError):
    """A label move timed out waiting for its version to become AVAILABLE; labels unchanged.

    Like :class:`RepositoryError` it is not a gateway-facing ``DomainError``: the
    gateway only meets it wrapped (calibration's ``LabelError``).
    """

    code = "version_not_ready"


class ModelRepository:
    """A model base path holding versioned models and ``models.config``.

    ``readiness`` decides whether a label move waits for its version to be served
    (see the module docstring); ``None`` means no server reads this repository,
    :data:`FROM_ENV` (the default) reads :data:`READY_GRPC_ENV` when first needed.
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        *,
        readiness: ReadinessCheck | None | str = FROM_ENV,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        ready_poll_s: float = 0.25,
    ) -> None:
        self.base = Path(base)
        self.readiness = readiness
        self.ready_timeout_s = ready_timeout_s
        self.ready_poll_s = ready_poll_s

    # -- versions ---------------------------------------------------------
    def model_names(self) -> list[str]:
        """Models that have at least one published version, sorted."""
        if not self.base.is_dir():
            return []
        return sorted(p.name for p in self.base.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Published version numbers of ``name``, ascending."""
        d = self.base / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and is_version_name(p.name))

    def version_dir(self, name: str, version: int) -> Path:
        return self.base / name / str(int(version))

    def next_version(self, name: str) -> int:
        """One more than the highest version on disk (including rejected candidates)."""
        d = self.base / name
        taken = [int(p.name) for p in d.iterdir() if is_version_name(p.name)] if d.is_dir() else []
        rejected = []
        if (d / "rejected").is_dir():
            rejected = [int(p.name) for p in (d / "rejected").iterdir() if is_version_name(p.name)]
        return max(taken + rejected, default=0) + 1

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive advisory lock on the repository (export, calibration, promotion)."""
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.base / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def staging_dir(self, name: str) -> Path:
        """A fresh directory on the same filesystem to build a version in."""
        (self.base / name).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.base / name))

    def publish(self, name: str, staging: Path, version: int | None = None) -> int:
        """Atomically move a finished staging directory to ``<name>/<version>``."""
        version = self.next_version(name) if version is None else int(version)
        target = self.version_dir(name, version)
        if target.exists():
            raise RepositoryError(f"{target} already exists; versions are immutable")
        os.rename(staging, target)
        _fsync_dir(target.parent)
        return version

    def reject(self, name: str, staging: Path, version: int) -> Path:
        """Keep a candidate that failed its gate for inspection, outside the served paths."""
        target = self.base / name / "rejected" / str(version)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        return target

    # -- models.config ----------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.base / CONFIG_FILE

    def read_config(self) -> model_server_config_pb2.ModelServerConfig:
        """Parse ``models.config`` (an empty config when the file does not exist)."""
        config = model_server_config_pb2.ModelServerConfig()
        if self.config_path.exists():
            text_format.Parse(self.config_path.read_text(), config)
        return config

    def write_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Write ``models.config`` atomically, models sorted by name for stable diffs."""
        entries = sorted(config.model_config_list.config, key=lambda c: c.name)
        ordered = model_server_config_pb2.ModelServerConfig()
        for entry in entries:
            ordered.model_config_list.config.add().CopyFrom(entry)
        text = (
            "# TF Serving --model_config_file. Written by `python -m training`;\n"
            "# edit with `python -m training promote|rollback`.\n"
            + text_format.MessageToString(ordered)
        )
        self.base.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_name(f".{CONFIG_FILE}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def _entry(self, config: model_server_config_pb2.ModelServerConfig, name: str):
        for entry in config.model_config_list.config:
            if entry.name == name:
                return entry
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = f"{SERVING_ROOT}/{name}"
        entry.model_platform = "tensorflow"
        return entry

    def labels(self, name: str) -> dict[str, int]:
        """Version labels of ``name`` in models.config (e.g. ``{"stable": 2}``)."""
        for entry in self.read_config().model_config_list.config:
            if entry.name == name:
                return dict(entry.version_labels)
        return {}

    def served_versions(self, name: str) -> list[int]:
        """Versions models.config asks TF Serving to load for ``name``."""
        for entry in self.read_config().model_config_list.config:
            if entry.name == name:
                return sorted(entry.model_version_policy.specific.versions)
        return []

    def set_labels(self, name: str, labels: dict[str, int], *, keep: int = 3) -> None:
        """Point labels at versions in two writes, waiting in between for them to be served.

        (a) :meth:`serve_versions` adds the versions to the ``specific`` policy (it
        keeps every labelled version and the ``keep`` newest served ones, so a
        rollback target is still loaded); (b) :meth:`wait_until_available`; (c) the
        labels move. A timeout in (b) raises :class:`VersionNotReadyError` and leaves
        every label where it was (the versions stay in the policy: loading them is
        harmless, and a retry finds them ready).
        """
        on_disk = set(self.versions(name))
        for label, version in labels.items():
            if version not in on_disk:
                raise RepositoryError(f"{name} has no version {version} for label {label!r}")
        self.serve_versions(name, [int(v) for v in labels.values()], keep=keep)
        for version in sorted({int(v) for v in labels.values()}):
            self.wait_until_available(name, version)
        config = self.read_config()
        entry = self._entry(config, name)
        for label, version in labels.items():
            entry.version_labels[label] = int(version)
        self._trim_policy(entry, keep)
        self.write_config(config)

    def serve_versions(self, name: str, versions: list[int], *, keep: int = 3) -> None:
        """Write (a) of a label move: ask the server to load ``versions``, labels untouched."""
        config = self.read_config()
        entry = self._entry(config, name)
        current = set(entry.model_version_policy.specific.versions)
        entry.model_version_policy.specific.versions.extend(sorted(set(versions) - current))
        self._trim_policy(entry, keep, extra=set(versions))
        self.write_config(config)

    def _trim_policy(self, entry, keep: int, extra: set[int] = frozenset()) -> None:
        """Serve the labelled versions, ``extra``, and the ``keep`` newest served ones."""
        on_disk = set(self.versions(entry.name))
        labelled = set(entry.version_labels.values()) | set(extra)
        previous = [v for v in entry.model_version_policy.specific.versions if v in on_disk]
        recent = sorted(set(previous) | labelled, reverse=True)[:keep]
        serve = sorted(labelled | set(recent))
        del entry.model_version_policy.specific.versions[:]
        entry.model_version_policy.specific.versions.extend(serve)

    def wait_until_available(self, name: str, version: int) -> None:
        """Write (b)'s wait: poll :attr:`readiness` until ``version`` is AVAILABLE.

        Returns at once when no readiness check is configured (offline use).
        """
        if self.readiness == FROM_ENV:
            address = os.environ.get(READY_GRPC_ENV, "").strip()
            self.readiness = tfserving_readiness(address) if address else None
        if self.readiness is None:
            return
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.readiness(name, int(version)):
            if time.monotonic() >= deadline:
                raise VersionNotReadyError(
                    f"{name} version {version} did not become AVAILABLE within "
                    f"{self.ready_timeout_s:g}s; labels left unchanged"
                )
            time.sleep(self.ready_poll_s)

    def history_path(self, name: str) -> Path:
        return self.base / name / "label_history.jsonl"


def tfserving_readiness(address: str, *, timeout_s: float = 5.0) -> ReadinessCheck:
    """A :data:`ReadinessCheck` asking TF Serving's ``GetModelStatus`` at ``address`` (host:port).

    A version is ready when TF Serving reports it AVAILABLE; NOT_FOUND (not loaded
    yet), a still-loading state or an unreachable server all mean "not yet".
    """
    import grpc
    from tensorflow_serving.apis import (
        get_model_status_pb2,
        model_service_pb2_grpc,
    )

    channel = grpc.insecure_channel(address)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE

    def ready(name: str, version: int) -> bool:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        request.model_spec.version.value = int(version)
        try:
            response = stub.GetModelStatus(request, timeout=timeout_s)
        except grpc.RpcError:
            return False
        return any(
            s.version == int(version) and s.state == available
            for s in response.model_version_status
        )

    return ready


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
