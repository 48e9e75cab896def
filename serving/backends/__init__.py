"""Model backends behind one interface (:class:`serving.backends.base.Backend`).

``embedded`` runs SavedModels in-process; ``tfserving-grpc`` and
``tfserving-rest`` forward to TensorFlow Serving. :func:`create_backend` picks
one from the settings; each module is imported only when chosen.
"""

from __future__ import annotations

from serving.backends.base import Backend, Servable, VersionStatus
from serving.settings import Settings

__all__ = ["Backend", "Servable", "VersionStatus", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    """The backend ``settings.backend`` names."""
    if settings.backend == "embedded":
        from serving.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(settings)
    if settings.backend == "tfserving-grpc":
        from serving.backends.tfserving_grpc import TFServingGrpcBackend

        return TFServingGrpcBackend(settings)
    if settings.backend == "tfserving-rest":
        from serving.backends.tfserving_rest import TFServingRestBackend

        return TFServingRestBackend(settings)
    raise ValueError(f"unknown backend {settings.backend!r}")
