"""What the service layer takes and returns: options, results, and the observer hook.

Both protocol layers build :class:`PredictOptions` from their requests and render
:class:`ClassifyResult` / :class:`DetectResult`; observers (drift, capture,
automatic calibration) receive a :class:`PredictionEvent` per successful request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from contract.preprocessing import ImageGeometry
from serving.catalog import ModelVersion
from serving.errors import InvalidParameter


# -- options and results -------------------------------------------------------------
@dataclass(frozen=True)
class PredictOptions:
    """What the client asked for besides the images (the same for REST and gRPC)."""

    model: str | None = None
    version: int | None = None
    label: str | None = None
    top_k: int | None = None
    score_threshold: float | None = None
    max_detections: int | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.version is not None and self.label:
            raise InvalidParameter("give either 'version' or 'label', not both")
        if self.version is not None and self.version < 1:
            raise InvalidParameter("'version' must be a positive integer")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidParameter("'top_k' must be >= 1")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise InvalidParameter("'score_threshold' must be between 0 and 1")
        if self.max_detections is not None and self.max_detections < 1:
            raise InvalidParameter("'max_detections' must be >= 1")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise InvalidParameter("the request timeout must be > 0 seconds")


@dataclass(frozen=True)
class LabelScore:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` is (ymin, xmin, ymax, xmax) in original image pixels."""

    label: str
    index: int
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageDetections:
    width: int
    height: int
    detections: list[Detection]


@dataclass(frozen=True)
class ModelRef:
    """The version that answered, and the version labels pointing at it."""

    name: str
    version: int
    labels: list[str]


@dataclass(frozen=True)
class ClassifyResult:
    request_id: str
    model: ModelRef
    predictions: list[list[LabelScore]]


@dataclass(frozen=True)
class DetectResult:
    request_id: str
    model: ModelRef
    detections: list[ImageDetections]


@dataclass(frozen=True)
class PredictResult:
    """A request's result with every signature output of the model, [n, ...] per output.

    ``outputs`` are the model's tensors as the backend returned them (``logits``,
    ``probabilities`` or the detection tensors, and the BN probe statistics): what
    TF Serving's Predict API answers.
    """

    result: ClassifyResult | DetectResult | TensorResult
    outputs: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class TensorResult:
    """A version's own signature outputs (``[n, ...]`` each) for preprocessed inputs."""

    request_id: str
    model: ModelRef
    outputs: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class PredictionEvent:
    """What one request produced, for observers (drift statistics, traffic capture).

    ``inputs`` are the preprocessed images [n, H, W, 3]; ``outputs`` every
    signature output for these images, [n, ...] (``bn_input_mean``,
    ``bn_input_sqmean`` among them); ``result`` the response; ``geometries``
    how each original image maps into ``inputs`` (empty for a tensor request).
    """

    request_id: str
    task: str
    model: ModelVersion
    inputs: np.ndarray
    outputs: Mapping[str, np.ndarray]
    result: ClassifyResult | DetectResult | TensorResult
    geometries: tuple[ImageGeometry, ...] = ()


class PredictionObserver(Protocol):
    """Receives every successful prediction; must be quick and must not raise."""

    def on_prediction(self, event: PredictionEvent) -> None: ...
