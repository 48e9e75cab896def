"""One backend interface for every place a forward pass can run.

A backend keeps the set of loaded versions in step with the repository
(:meth:`Backend.sync`, called on every poll) and hands out a :class:`Servable`
per (model, version). A servable is a handle: once obtained it stays usable
even after its version leaves service, so requests already queued for it finish
(the embedded backend keeps the SavedModel alive through the reference; remote
backends address the version by number).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from serving.catalog import ModelVersion, RepositorySnapshot

# TF Serving's ModelVersionStatus states, used by every backend.
START = "START"
LOADING = "LOADING"
AVAILABLE = "AVAILABLE"
UNLOADING = "UNLOADING"
END = "END"


@dataclass(frozen=True)
class VersionStatus:
    """Load state of one version, in TF Serving's terms, with an error message if it failed."""

    version: int
    state: str
    error: str = ""


class Servable(abc.ABC):
    """A loaded model version that runs forward passes on preprocessed batches."""

    def __init__(self, model: ModelVersion) -> None:
        self.model = model

    @abc.abstractmethod
    def predict(
        self, images: np.ndarray, *, timeout: float, request_ids: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Run ``serving_default`` on ``images`` (float32 [B, H, W, 3]); every output, [B, ...].

        Raises :class:`serving.errors.ServingError` subclasses: ``BackendTimeout``
        past ``timeout`` seconds, ``BackendUnavailable`` when unreachable,
        ``BackendError`` for any other backend failure.
        """


class Backend(abc.ABC):
    """Where forward passes run: ``embedded``, ``tfserving-grpc`` or ``tfserving-rest``."""

    name = "abstract"

    @abc.abstractmethod
    def sync(self, snapshot: RepositorySnapshot) -> None:
        """Bring the loaded versions in line with ``snapshot`` (load new, retire old)."""

    @abc.abstractmethod
    def servable(self, name: str, version: int) -> Servable | None:
        """The servable of an AVAILABLE version, or None."""

    @abc.abstractmethod
    def available(self) -> Mapping[str, Sequence[int]]:
        """Model name -> versions AVAILABLE now."""

    @abc.abstractmethod
    def status(self, name: str) -> list[VersionStatus]:
        """Every version of ``name`` the backend knows, with its state."""

    @abc.abstractmethod
    def check(self) -> tuple[bool, str]:
        """(reachable, reason) for readiness; the embedded backend is always reachable."""

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing to release
        """Release connections and models."""
