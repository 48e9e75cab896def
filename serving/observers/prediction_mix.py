"""Label-shift and confidence signals: ``imgserve_predictions_total`` and
``imgserve_prediction_confidence`` (top-1 class per classified image, detections
with score >= 0.5)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram
from prometheus_client.registry import CollectorRegistry

CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class PredictionMix:
    """Label-shift and confidence signals: predicted-class counts and confidences."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.predictions = Counter(
            "imgserve_predictions_total",
            "Predicted classes (top-1 per image; detections with score >= 0.5).",
            ["model", "class"],
            registry=registry,
        )
        self.confidence = Histogram(
            "imgserve_prediction_confidence",
            "Top-1 probability per classified image, score per reported detection.",
            ["model"],
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        self._counters: dict[tuple[str, str], Any] = {}
        self._confidences: dict[str, Any] = {}

    def on_prediction(self, event: Any) -> None:
        with contextlib.suppress(Exception):
            labels = event.model.class_labels
            name = event.model.name
            out = event.outputs
            if "probabilities" in out:
                probs = np.asarray(out["probabilities"])
                top = probs.argmax(axis=1)
                confidence = self._confidence(name)
                for k, p in zip(
                    top.tolist(), probs[np.arange(len(top)), top].tolist(), strict=True
                ):
                    self._counter(name, labels[k]).inc()
                    confidence.observe(p)
            elif "detection_scores" in out:
                scores = np.asarray(out["detection_scores"])
                classes = np.asarray(out["detection_classes"]).astype(int)
                confidence = self._confidence(name)
                for s_row, c_row in zip(scores, classes, strict=True):
                    keep = s_row >= 0.5
                    for s, c in zip(s_row[keep].tolist(), c_row[keep].tolist(), strict=True):
                        self._counter(name, labels[c]).inc()
                        confidence.observe(s)

    # The children per label set, looked up once: ``labels()`` validates and locks per call.
    def _counter(self, model: str, cls: str) -> Any:
        child = self._counters.get((model, cls))
        if child is None:
            child = self._counters[(model, cls)] = self.predictions.labels(model, cls)
        return child

    def _confidence(self, model: str) -> Any:
        child = self._confidences.get(model)
        if child is None:
            child = self._confidences[model] = self.confidence.labels(model)
        return child
