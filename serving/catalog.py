"""What the model repository offers: models, versions to serve, labels, model cards.

The gateway reads the repository the way TF Serving does: ``models.config``
lists the models, their version policy and version labels; each version
directory carries its model card. A :class:`RepositorySnapshot` is an immutable
picture of that, rebuilt by :meth:`Catalog.scan` on every poll, so readers never
see a half-updated state. Which of the wanted versions are actually loaded is the
backend's business (``serving.backends``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.model_card import ModelCard, ModelCardError, read_model_card
from contract.preprocessing import PreprocessSpec
from contract.repository import ModelRepository

log = logging.getLogger(__name__)

CLASSIFICATION = "classification"
DETECTION = "detection"


@dataclass(frozen=True)
class ModelVersion:
    """One published version and everything its model card says about serving it."""

    name: str
    version: int
    path: Path
    card: ModelCard
    spec: PreprocessSpec

    @property
    def task(self) -> str:
        return self.card.task

    @property
    def class_labels(self) -> list[str]:
        return list(self.card.labels)

    @property
    def signature_name(self) -> str:
        return self.card.signature.name

    @property
    def input_name(self) -> str:
        return self.card.input.tensor


@dataclass(frozen=True)
class ModelEntry:
    """A model of the repository: the versions to serve, labels, and load problems."""

    name: str
    versions: Mapping[int, ModelVersion]
    labels: Mapping[str, int]
    errors: Mapping[int, str] = field(default_factory=dict)

    @property
    def task(self) -> str | None:
        newest = max(self.versions, default=None)
        return None if newest is None else self.versions[newest].task


@dataclass(frozen=True)
class RepositorySnapshot:
    """An immutable picture of the repository at one poll."""

    models: Mapping[str, ModelEntry]
    config_error: str = ""

    def wanted(self) -> set[tuple[str, int]]:
        """(name, version) pairs the version policies ask to serve."""
        return {(m.name, v) for m in self.models.values() for v in m.versions}


class Catalog:
    """Reads the repository; caches model cards by directory and mtime."""

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.repository = ModelRepository(base)
        self._cards: dict[Path, tuple[float, ModelVersion]] = {}

    @property
    def base(self) -> Path:
        return self.repository.base

    def scan(self) -> RepositorySnapshot:
        """Read ``models.config`` and the cards of the versions its policies select.

        Without ``models.config`` every model on disk is served at its newest
        version (TF Serving's single-model default). A broken config keeps the
        gateway on an empty snapshot with ``config_error`` set, which readiness reports.
        """
        try:
            config = self.repository.read_config()
        except Exception as exc:  # a text-proto parse error is reported, not raised
            log.error("cannot parse %s: %s", self.repository.config_path, exc)
            return RepositorySnapshot({}, config_error=f"models.config: {exc}")
        entries = list(config.model_config_list.config)
        models: dict[str, ModelEntry] = {}
        if entries:
            for entry in entries:
                on_disk = self.repository.versions(entry.name)
                wanted = _apply_policy(entry.model_version_policy, on_disk)
                models[entry.name] = self._entry(entry.name, wanted, dict(entry.version_labels))
        else:
            for name in self.repository.model_names():
                wanted = self.repository.versions(name)[-1:]
                models[name] = self._entry(name, wanted, {})
        return RepositorySnapshot(models)

    def _entry(self, name: str, versions: list[int], labels: dict[str, int]) -> ModelEntry:
        found: dict[int, ModelVersion] = {}
        errors: dict[int, str] = {}
        for version in versions:
            try:
                found[version] = self.version(name, version)
            except (ModelCardError, ValueError, KeyError, OSError) as exc:
                log.error("model %s version %d is not servable: %s", name, version, exc)
                errors[version] = str(exc)
        return ModelEntry(name, found, labels, errors)

    def version(self, name: str, version: int) -> ModelVersion:
        """The :class:`ModelVersion` of a version directory (card read once per mtime)."""
        path = self.repository.version_dir(name, version)
        mtime = path.stat().st_mtime
        cached = self._cards.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        card = read_model_card(path)
        spec = card.preprocess_spec
        if card.name != name or int(card.version) != version:
            # A copied directory whose card describes another version would answer
            # with the wrong labels; refuse it.
            raise ModelCardError(
                f"card says {card.name}/{card.version}, directory is {name}/{version}"
            )
        mv = ModelVersion(name, version, path, card, spec)
        self._cards[path] = (mtime, mv)
        return mv


def _apply_policy(policy: Any, on_disk: list[int]) -> list[int]:
    """TF Serving's version policy: ``latest`` (default 1), ``all``, or ``specific``."""
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(on_disk)
    if which == "specific":
        return sorted(v for v in policy.specific.versions if v in set(on_disk))
    n = policy.latest.num_versions if which == "latest" and policy.latest.num_versions else 1
    return sorted(on_disk)[-n:]


def signature_defs(mv: ModelVersion) -> dict[str, Any]:
    """The version's SavedModel signature defs, as TF Serving prints them in model metadata.

    Read from ``saved_model.pb`` (what TF Serving loads), so the dtype names
    (``DT_FLOAT``), shapes (``"size": "-1"``), tensor names and method names are
    the served graph's own, not a reconstruction from the model card.
    """
    pb = mv.path / "saved_model.pb"
    return _signature_defs(str(pb), pb.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _signature_defs(pb: str, mtime_ns: int) -> dict[str, Any]:
    # Imported here: only the metadata route needs TensorFlow's protos, and the
    # tfserving-rest backend otherwise never imports TensorFlow.
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel.FromString(Path(pb).read_bytes())
    return {
        name: json_format.MessageToDict(
            sig, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for name, sig in model.meta_graphs[0].signature_def.items()
    }
