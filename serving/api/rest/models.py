"""``GET /v1/models`` and ``GET /v1/models/<name>``: versions, labels, states, model cards."""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from serving.api.rest.inference import service

bp = Blueprint("models", __name__)


@bp.get("/v1/models")
def list_models():
    return jsonify({"models": service().list_models()})


@bp.get("/v1/models/<name>")
def describe_model(name: str):
    svc = service()
    g.metric_model = svc.known_model(name)
    return jsonify(svc.describe_model(name))
