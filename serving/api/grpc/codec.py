"""gRPC messages <-> service-layer types (``serving/proto/imgserve.proto``)."""

from __future__ import annotations

import json
from typing import Any

from serving.proto import imgserve_pb2
from serving.service import ClassifyResult, DetectResult, PredictOptions


def options_from_message(request: Any, task: str, time_remaining: float | None) -> PredictOptions:
    """:class:`PredictOptions` from a Classify/DetectRequest and the call's deadline."""
    selector = request.model
    choice = selector.WhichOneof("version_choice")
    return PredictOptions(
        model=selector.name or None,
        version=selector.version if choice == "version" else None,
        label=selector.label if choice == "label" else None,
        top_k=request.top_k if task == "classification" and request.HasField("top_k") else None,
        score_threshold=(request.score_threshold if request.HasField("score_threshold") else None),
        max_detections=(
            request.max_detections
            if task == "detection" and request.HasField("max_detections")
            else None
        ),
        timeout_s=time_remaining if time_remaining is not None and time_remaining > 0 else None,
    )


def _model_ref(ref: Any) -> imgserve_pb2.ModelRef:
    return imgserve_pb2.ModelRef(name=ref.name, version=ref.version, labels=ref.labels)


def classify_message(result: ClassifyResult) -> imgserve_pb2.ClassifyResponse:
    """The ClassifyResponse for a service-layer :class:`ClassifyResult`."""
    return imgserve_pb2.ClassifyResponse(
        request_id=result.request_id,
        model=_model_ref(result.model),
        predictions=[
            imgserve_pb2.Classification(
                classes=[
                    imgserve_pb2.ClassScore(label=c.label, index=c.index, score=c.score)
                    for c in classes
                ]
            )
            for classes in result.predictions
        ],
    )


def detect_message(result: DetectResult) -> imgserve_pb2.DetectResponse:
    """The DetectResponse for a :class:`DetectResult` (boxes in original image pixels)."""
    return imgserve_pb2.DetectResponse(
        request_id=result.request_id,
        model=_model_ref(result.model),
        predictions=[
            imgserve_pb2.ImageDetections(
                width=image.width,
                height=image.height,
                detections=[
                    imgserve_pb2.Detection(
                        label=d.label,
                        index=d.index,
                        score=d.score,
                        box=imgserve_pb2.Box(
                            ymin=d.box[0], xmin=d.box[1], ymax=d.box[2], xmax=d.box[3]
                        ),
                    )
                    for d in image.detections
                ],
            )
            for image in result.detections
        ],
    )


def model_message(model: dict[str, Any]) -> imgserve_pb2.ModelInfo:
    """The ModelInfo for one model as the service describes it (cards as JSON text)."""
    return imgserve_pb2.ModelInfo(
        name=model["name"],
        task=model["task"] or "",
        default_version=model["default_version"] or 0,
        version_labels=model["version_labels"],
        class_labels=model["class_labels"],
        versions=[
            imgserve_pb2.VersionInfo(
                version=v["version"],
                state=v["state"],
                labels=v["labels"],
                error=v.get("error", ""),
                model_card_json=json.dumps(v["model_card"]) if "model_card" in v else "",
            )
            for v in model["versions"]
        ],
    )
