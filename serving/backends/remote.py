"""What the two TF Serving backends share: status polling and the signature check.

TF Serving loads versions on its own schedule (it polls the same repository).
On every gateway poll a :class:`RemoteBackend` asks it for each model's version
states; a version serves through the gateway once TF Serving reports it
AVAILABLE, the gateway has its model card, and TF Serving's signature for it
(model metadata) matches the card's ``signature``. A mismatch keeps the version
out of service with the reason in ``/v1/models/<name>``: serving a model whose
outputs the gateway would misread is worse than not serving it.

When TF Serving cannot be reached the last known versions stay in service, so
requests fail fast with 502 (and readiness reports the backend down) rather
than pretending nothing was ever loaded.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from serving.backends.base import AVAILABLE, Backend, Servable, VersionStatus
from serving.catalog import CLASSIFICATION, ModelVersion, RepositorySnapshot
from serving.errors import BackendUnavailable, ServingError

log = logging.getLogger(__name__)

REQUIRED_OUTPUTS = {
    CLASSIFICATION: ("logits", "probabilities"),
    "detection": ("detection_boxes", "detection_scores", "detection_classes", "num_detections"),
}
#: Seconds allowed for a status or metadata call during a poll.
CONTROL_TIMEOUT_S = 2.0
#: Most request ids forwarded with one batched call (as ``x-request-id``, comma separated).
FORWARDED_IDS = 16


@dataclass(frozen=True)
class TensorSpec:
    """A signature tensor as TF Serving describes it: dtype name (``DT_FLOAT``) and shape."""

    dtype: str
    shape: tuple[int, ...] | None  # None: unknown rank; -1: unknown dimension


@dataclass(frozen=True)
class SignatureSpec:
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]


def check_signature(mv: ModelVersion, served: SignatureSpec) -> str:
    """'' when TF Serving's signature fits the model card, else the reason it does not."""
    card_outputs = mv.card.signature.outputs
    inp = served.inputs.get(mv.input_name)
    if inp is None:
        return f"input {mv.input_name!r} missing (served inputs {sorted(served.inputs)})"
    if inp.dtype != "DT_FLOAT":
        return f"input {mv.input_name!r} is {inp.dtype}, expected DT_FLOAT"
    expected_shape = (-1, mv.spec.height, mv.spec.width, 3)
    if inp.shape is not None and inp.shape != expected_shape:
        return f"input shape {list(inp.shape)} does not fit the card's {list(expected_shape)}"
    needed = set(REQUIRED_OUTPUTS.get(mv.task, ())) | set(card_outputs)
    missing = sorted(needed - set(served.outputs))
    if missing:
        return f"outputs {missing} missing (served outputs {sorted(served.outputs)})"
    return ""


class RemoteBackend(Backend):
    """Keeps the set of AVAILABLE, signature-checked versions of a TF Serving."""

    def __init__(self) -> None:
        self._servables: dict[tuple[str, int], Servable] = {}
        self._status: dict[str, list[VersionStatus]] = {}
        self._checked: dict[tuple[str, int], str] = {}  # signature check result per version
        self._reachable = (False, "not contacted yet")
        self._lock = threading.Lock()

    # -- what each protocol supplies ---------------------------------------------------
    @abc.abstractmethod
    def fetch_status(self, name: str) -> list[VersionStatus]:
        """TF Serving's version states of ``name`` ([] when it has none); raises when unreachable."""

    @abc.abstractmethod
    def fetch_signature(self, mv: ModelVersion) -> SignatureSpec:
        """TF Serving's signature of ``mv`` (model metadata); raises when unreachable."""

    @abc.abstractmethod
    def make_servable(self, mv: ModelVersion) -> Servable:
        """A handle that forwards predicts for ``mv``."""

    # -- Backend ------------------------------------------------------------------------
    def sync(self, snapshot: RepositorySnapshot) -> None:
        servables: dict[tuple[str, int], Servable] = {}
        statuses: dict[str, list[VersionStatus]] = {}
        try:
            for name, entry in snapshot.models.items():
                remote = self.fetch_status(name)
                statuses[name] = remote
                for status in remote:
                    mv = entry.versions.get(status.version)
                    if status.state != AVAILABLE or mv is None:
                        continue
                    key = (name, status.version)
                    if key not in self._checked:
                        self._checked[key] = check_signature(mv, self.fetch_signature(mv))
                        if self._checked[key]:
                            log.error(
                                "%s/%d not served: %s", name, status.version, self._checked[key]
                            )
                    if self._checked[key]:
                        continue
                    existing = self._servables.get(key)
                    servables[key] = existing if existing is not None else self.make_servable(mv)
        except Exception as exc:  # any failure to ask TF Serving counts as unreachable
            # Keep serving what was known; readiness reports the backend down.
            detail = exc.detail if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"
            self._reachable = (False, detail)
            return
        self._reachable = (True, "")
        with self._lock:
            self._servables = servables
            self._status = {
                name: [
                    VersionStatus(
                        s.version, s.state, s.error or self._checked.get((name, s.version), "")
                    )
                    for s in remote
                ]
                for name, remote in statuses.items()
            }

    def servable(self, name: str, version: int) -> Servable | None:
        return self._servables.get((name, version))

    def available(self) -> Mapping[str, Sequence[int]]:
        out: dict[str, list[int]] = {}
        for name, version in sorted(self._servables):
            out.setdefault(name, []).append(version)
        return out

    def status(self, name: str) -> list[VersionStatus]:
        with self._lock:
            return list(self._status.get(name, []))

    def check(self) -> tuple[bool, str]:
        return self._reachable


def unreachable(address: str, detail: str) -> BackendUnavailable:
    return BackendUnavailable(f"TF Serving at {address} is unreachable: {detail}")
