"""``POST /v1/classify`` and ``POST /v1/detect``: thin adapters over the service layer."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from serving.api.rest.payload import parse_predict_request
from serving.service import ClassifyResult, DetectResult, InferenceService, ModelRef

bp = Blueprint("inference", __name__)


def service() -> InferenceService:
    return current_app.extensions["imgserve"]


@bp.post("/v1/classify")
def classify():
    svc = service()
    images, options = parse_predict_request(request, svc.settings.max_images_per_request)
    g.metric_model = svc.known_model(svc.model_for("classification", options))
    return jsonify(classify_json(svc.classify(images, options, g.request_id)))


@bp.post("/v1/detect")
def detect():
    svc = service()
    images, options = parse_predict_request(request, svc.settings.max_images_per_request)
    g.metric_model = svc.known_model(svc.model_for("detection", options))
    return jsonify(detect_json(svc.detect(images, options, g.request_id)))


def model_json(ref: ModelRef) -> dict[str, Any]:
    return {"name": ref.name, "version": ref.version, "labels": ref.labels}


def classify_json(result: ClassifyResult) -> dict[str, Any]:
    """The JSON body of a classification answer."""
    return {
        "request_id": result.request_id,
        "model": model_json(result.model),
        "predictions": [
            {"classes": [{"label": c.label, "index": c.index, "score": c.score} for c in classes]}
            for classes in result.predictions
        ],
    }


def detect_json(result: DetectResult) -> dict[str, Any]:
    """The JSON body of a detection answer; boxes in original image pixels."""
    return {
        "request_id": result.request_id,
        "model": model_json(result.model),
        "predictions": [
            {
                "width": image.width,
                "height": image.height,
                "detections": [
                    {
                        "label": d.label,
                        "index": d.index,
                        "score": d.score,
                        "box": dict(zip(("ymin", "xmin", "ymax", "xmax"), d.box, strict=True)),
                    }
                    for d in image.detections
                ],
            }
            for image in result.detections
        ],
    }
