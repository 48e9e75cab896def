"""The service layer: classify and detect over one backend, knowing nothing of HTTP or gRPC.

``types`` holds what the protocol layers pass in and get back, ``request_ids`` the
request id rule and access log they share, ``inference`` the :class:`InferenceService` itself.
"""

from serving.service.inference import InferenceService
from serving.service.request_ids import ACCESS_LOG, request_id_from
from serving.service.types import (
    ClassifyResult,
    Detection,
    DetectResult,
    ImageDetections,
    LabelScore,
    ModelRef,
    PredictionEvent,
    PredictionObserver,
    PredictOptions,
    PredictResult,
    TensorResult,
)

__all__ = [
    "ACCESS_LOG",
    "ClassifyResult",
    "DetectResult",
    "Detection",
    "ImageDetections",
    "InferenceService",
    "LabelScore",
    "ModelRef",
    "PredictOptions",
    "PredictResult",
    "PredictionEvent",
    "PredictionObserver",
    "TensorResult",
    "request_id_from",
]
