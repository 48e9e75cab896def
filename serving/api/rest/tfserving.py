"""TF Serving's REST API at the gateway: thin adapters over the service layer.

- ``GET /v1/models/{m}[/versions/{v}|/labels/{l}]``: the model as ``/v1/models`` lists
  it, with model cards, plus TF Serving's ``model_version_status``;
- ``GET .../metadata``: TF Serving's model metadata (the SavedModel's signature defs);
- ``POST ...:predict``: every signature output of the model per image;
- ``POST ...:classify``: ``[label, score]`` pairs per example (classifiers only).

Images go through the same preprocessing, batching, metrics and observers as
``/v1/classify`` (see :mod:`serving.api.rest.tfserving_codec` for the bodies).
Errors stay problem documents, with TF Serving's ``error`` member and TF
Serving's HTTP status for the failure's gRPC code (its ``ToHTTPStatusCode``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
from flask import Blueprint, Flask, Response, g, jsonify, request
from werkzeug.routing import BaseConverter

from serving.api import errors
from serving.api.rest import problems
from serving.api.rest.inference import service
from serving.api.rest.payload import read_body
from serving.api.rest.tfserving_codec import (
    classify_json,
    parse_classify,
    parse_predict,
    predict_json,
)
from serving.catalog import CLASSIFICATION, signature_defs
from serving.errors import InvalidParameter, LabelNotFound, VersionNotFound
from serving.service import PredictOptions

bp = Blueprint("tfserving", __name__)

_CODE = grpc.StatusCode
#: TF Serving's ``ToHTTPStatusCode`` (``model_servers/http_server.cc``).
HTTP_STATUS = {
    _CODE.CANCELLED: 499,
    _CODE.UNKNOWN: 500,
    _CODE.INVALID_ARGUMENT: 400,
    _CODE.DEADLINE_EXCEEDED: 504,
    _CODE.NOT_FOUND: 404,
    _CODE.ALREADY_EXISTS: 409,
    _CODE.PERMISSION_DENIED: 403,
    _CODE.RESOURCE_EXHAUSTED: 429,
    _CODE.FAILED_PRECONDITION: 400,
    _CODE.ABORTED: 409,
    _CODE.OUT_OF_RANGE: 400,
    _CODE.UNIMPLEMENTED: 501,
    _CODE.INTERNAL: 500,
    _CODE.UNAVAILABLE: 503,
    _CODE.DATA_LOSS: 500,
    _CODE.UNAUTHENTICATED: 401,
}
#: ``top_k`` asking for every class (the service caps k at the number of labels).
EVERY_CLASS = 2**31 - 1
_VERSION_CHOICES = ("", "/versions/<int:version>", "/labels/<model:label>")


class ModelNameConverter(BaseConverter):
    """A model name or version label: TF Serving's ``[^/:]+``, so ``m:predict`` is no name."""

    regex = "[^/:]+"


def init_app(app: Flask) -> None:
    """Register the ``model`` URL converter (before any blueprint uses it) and the routes."""
    app.url_map.converters["model"] = ModelNameConverter
    app.register_blueprint(bp)


def _route(suffix: str, methods: list[str]):
    def register(view):
        for choice in _VERSION_CHOICES:
            bp.add_url_rule(
                f"/v1/models/<model:name>{choice}{suffix}", view_func=view, methods=methods
            )
        return view

    return register


def _options(name: str, version: int | None, label: str | None) -> PredictOptions:
    return PredictOptions(model=name, version=version, label=label)


@_route("", ["GET"])
def model_status(name: str, version: int | None = None, label: str | None = None):
    """The model (versions, labels, cards) with TF Serving's ``model_version_status``."""
    svc = service()
    g.metric_model = svc.known_model(name)
    doc = svc.describe_model(name)
    if label is not None:
        version = doc["version_labels"].get(label)
        if version is None:
            raise LabelNotFound(f"Unrecognized servable version label: {label}")
    versions = [v for v in doc["versions"] if version is None or v["version"] == version]
    if not versions:
        raise VersionNotFound(f"Could not find version {version} of model {name}")
    doc["model_version_status"] = [version_status_json(v) for v in versions]
    return jsonify(doc)


@_route("/metadata", ["GET"])
def model_metadata(name: str, version: int | None = None, label: str | None = None):
    """TF Serving's GetModelMetadata: the answering version's signature defs."""
    svc = service()
    g.metric_model = svc.known_model(name)
    mv = svc.resolve(_options(name, version, label))
    return jsonify(
        {
            "model_spec": {"name": mv.name, "signature_name": "", "version": str(mv.version)},
            "metadata": {"signature_def": {"signature_def": signature_defs(mv)}},
        }
    )


@_route(":predict", ["POST"])
def predict(name: str, version: int | None = None, label: str | None = None):
    """Every output of the model's signature for each image, in the request's format."""
    svc = service()
    g.metric_model = svc.known_model(name)
    images, fmt = parse_predict(read_body(request), svc.settings.max_images_per_request)
    result = svc.predict(images, _options(name, version, label), g.request_id)
    return jsonify(predict_json(result.outputs, fmt))


@_route(":classify", ["POST"])
def classify(name: str, version: int | None = None, label: str | None = None):
    """Every class with its probability for each example, best first (classifiers only)."""
    svc = service()
    g.metric_model = svc.known_model(name)
    images = parse_classify(read_body(request), svc.settings.max_images_per_request)
    task = svc.task_of(name)
    if task != CLASSIFICATION:
        raise InvalidParameter(
            "Expected classification signature method_name to be tensorflow/serving/classify. "
            f"Was: tensorflow/serving/predict ({name} is a {task} model; use :predict)"
        )
    options = replace(_options(name, version, label), top_k=EVERY_CLASS)
    return jsonify(classify_json(svc.classify(images, options, g.request_id)))


def version_status_json(item: dict[str, Any]) -> dict[str, Any]:
    """One ``/v1/models/<name>`` version as TF Serving's ``ModelVersionStatus`` JSON."""
    error = item.get("error", "")
    return {
        "version": str(item["version"]),
        "state": item["state"],
        "status": {"error_code": "UNKNOWN" if error else "OK", "error_message": error},
    }


@bp.errorhandler(Exception)
def tfserving_error(exc: Exception) -> Response:
    """The problem document with TF Serving's ``error`` member and HTTP status."""
    if errors.resolve(exc) is None:
        return problems.problem_response(exc, error_member=True)  # a bug: logged, 500
    # TF Serving reports an unknown label as INVALID_ARGUMENT (ServerCore), not NOT_FOUND.
    code = _CODE.INVALID_ARGUMENT if isinstance(exc, LabelNotFound) else errors.grpc_code(exc)
    return problems.problem_response(
        exc, status=HTTP_STATUS.get(code, errors.http_status(exc)), error_member=True
    )
