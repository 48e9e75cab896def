"""Gateway settings for tests: one backend, one model base, polling off."""

from __future__ import annotations

from pathlib import Path

from serving.settings import Settings
from tests.helpers.tfserving_standin import TFServingStandIn


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
