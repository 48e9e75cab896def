"""The TF Serving model repository on disk: versions, ``models.config``, labels.

Layout (see the design's "model repository" contract)::

    <base>/models.config                ModelServerConfig text proto
    <base>/<name>/<version>/            SavedModel, published atomically
    <base>/<name>/.staging-*/           work in progress, never a number

A version appears by ``os.rename`` of a finished staging directory, so TF Serving
and the gateway, which poll the base path, never see half a model. Every write of
``models.config`` is also write-then-rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

CONFIG_FILE = "models.config"
#: Where TF Serving sees the repository inside its container (base_path prefix).
SERVING_ROOT = "/models"


class RepositoryError(RuntimeError):
    """A model repository operation that cannot be done as asked."""


class ModelRepository:
    """A model base path holding versioned models and ``models.config``."""

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = Path(base)

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
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())

    def version_dir(self, name: str, version: int) -> Path:
        return self.base / name / str(int(version))

    def next_version(self, name: str) -> int:
        """One more than the highest version on disk (including rejected candidates)."""
        d = self.base / name
        taken = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
        rejected = []
        if (d / "rejected").is_dir():
            rejected = [int(p.name) for p in (d / "rejected").iterdir() if p.name.isdigit()]
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
        """Point labels at versions and serve exactly the labelled versions plus recent ones.

        TF Serving only accepts a label for a version it has loaded, so the
        ``specific`` version policy always lists every labelled version; it also
        keeps the ``keep`` newest labelled-or-previously-served versions, so a
        rollback target is still loaded.
        """
        config = self.read_config()
        entry = self._entry(config, name)
        on_disk = set(self.versions(name))
        for label, version in labels.items():
            if version not in on_disk:
                raise RepositoryError(f"{name} has no version {version} for label {label!r}")
            entry.version_labels[label] = int(version)
        labelled = set(entry.version_labels.values())
        previous = [v for v in entry.model_version_policy.specific.versions if v in on_disk]
        recent = sorted(set(previous) | labelled, reverse=True)[:keep]
        serve = sorted(labelled | set(recent))
        del entry.model_version_policy.specific.versions[:]
        entry.model_version_policy.specific.versions.extend(serve)
        self.write_config(config)

    def history_path(self, name: str) -> Path:
        return self.base / name / "label_history.jsonl"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
