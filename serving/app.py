"""The Flask application factory: ``create_app(config=None)``.

gunicorn runs ``'serving.app:create_app()'`` once per worker (no preload: each
worker must start its own TensorFlow runtime after the fork). The factory reads
the settings, builds the backend and the service layer, loads the models the
repository offers, and registers the REST blueprints. Importing this module only
prepares TensorFlow's environment and imports it (``contract/tf_environment.py``:
CPU only without an NVIDIA device, its start-up lines as JSON log records).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from contract.tf_environment import import_tensorflow, prepare_tensorflow_environment

prepare_tensorflow_environment()
import_tensorflow()  # first, so that its C++ start-up lines become log records

from flask import Flask  # noqa: E402

from contract.logs import configure_logging  # noqa: E402
from serving.api import rest  # noqa: E402
from serving.backends import create_backend  # noqa: E402
from serving.observers.wiring import attach  # noqa: E402
from serving.service import InferenceService  # noqa: E402
from serving.settings import Settings  # noqa: E402


def create_app(
    config: Settings | Mapping[str, Any] | None = None,
    *,
    service: InferenceService | None = None,
) -> Flask:
    """Build the gateway's WSGI app.

    ``config`` is a :class:`Settings`, or a mapping of setting names (``model_base``
    or ``IMGSERVE_MODEL_BASE``) applied over the environment, or None for the
    environment alone. ``service`` lets a caller share an existing service layer
    (the app then does not own or start it).
    """
    settings = config if isinstance(config, Settings) else Settings.from_mapping(config or {})
    if not logging.getLogger().handlers:
        # Not under gunicorn (whose logconfig_dict already did this): JSON lines all the same.
        configure_logging(settings.log_level)
    app = Flask("serving")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if service is None:
        service = InferenceService(settings, create_backend(settings)).start()
    app.extensions["imgserve"] = service
    app.extensions["imgserve.monitoring"] = attach(service, settings)
    rest.init_app(app)
    return app
