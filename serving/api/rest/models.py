"""``GET /v1/models``: every model with its versions, states and labels.

One model (``GET /v1/models/<name>``, with model cards) is TF Serving's model
status API, in :mod:`serving.api.rest.tfserving`.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from serving.api.rest.inference import service

bp = Blueprint("models", __name__)


@bp.get("/v1/models")
def list_models():
    return jsonify({"models": service().list_models()})
