"""Probes, metrics and the API description: ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.*``.

None of these count as requests in the metrics (Prometheus scrapes and kubelet
probes would drown the real traffic).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, Response, jsonify

from serving.api.rest.inference import service
from serving.errors import ServiceUnavailable

OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.yaml"

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Alive: the process answers. Never depends on models or backends."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Ready: the backend answers and at least one model version serves."""
    svc = service()
    ready, details = svc.readiness()
    if not ready:
        raise ServiceUnavailable(
            "; ".join(details.get("reasons", [])),
            retry_after=svc.settings.retry_after_s,
            extra={"readiness": details},
        )
    return jsonify({"status": "ready", **details})


@bp.get("/metrics")
def metrics():
    body, content_type = service().metrics.render()
    return Response(body, content_type=content_type)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI description shipped in ``serving/openapi.yaml``."""
    return yaml.safe_load(OPENAPI_PATH.read_text())


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_document())


@bp.get("/openapi.yaml")
def openapi_yaml():
    return Response(OPENAPI_PATH.read_text(), mimetype="application/yaml")
