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


# -- feedback --------------------------------------------------------------------------
def _label_value(label: Any) -> str | int | None:
    """A TrueLabel's name or index; None when neither is set (the store refuses it)."""
    which = label.WhichOneof("value")
    return getattr(label, which) if which else None


def _box_values(box: Any) -> list[float]:
    return [box.ymin, box.xmin, box.ymax, box.xmax]


def feedback_from_message(request: Any) -> dict[str, Any]:
    """A FeedbackRequest as :func:`serving.service.feedback.give_feedback`'s keywords."""
    truth = request.WhichOneof("truth")
    labels = objects = None
    if truth == "labels":
        labels = [_label_value(lab) for lab in request.labels.labels]
    elif truth == "objects":
        objects = [
            [
                {
                    "label": _label_value(o.label),
                    "box": _box_values(o.box) if o.HasField("box") else None,
                }
                for o in image.objects
            ]
            for image in request.objects.images
        ]
    return {"labels": labels, "objects": objects, "model": request.model or None}


def _true_label(value: str | int) -> imgserve_pb2.TrueLabel:
    if isinstance(value, str):
        return imgserve_pb2.TrueLabel(name=value)
    return imgserve_pb2.TrueLabel(index=value)


def _box(values: Any) -> imgserve_pb2.Box:
    ymin, xmin, ymax, xmax = (float(v) for v in values)
    return imgserve_pb2.Box(ymin=ymin, xmin=xmin, ymax=ymax, xmax=xmax)


def feedback_message(result: Any) -> imgserve_pb2.FeedbackResponse:
    """The FeedbackResponse for a :class:`calibration.feedback.FeedbackResult`."""
    response = imgserve_pb2.FeedbackResponse(
        request_id=result.request_id, model=result.model, created=result.created
    )
    if result.objects is None:
        response.labels.labels.extend(_true_label(lab) for lab in result.labels)
        return response
    for objs in result.objects:
        image = response.objects.images.add()
        for o in objs:
            image.objects.add(
                label=_true_label(o["label"]), box=_box(o["box"]), input_box=_box(o["input_box"])
            )
    return response
