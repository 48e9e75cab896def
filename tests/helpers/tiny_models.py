"""Tiny models exported through the real exporter (``contract.export.export_model``).

They follow the repository contract exactly (signature, model card, warm-up
records, ``models.config`` labels) and load in well under a second, so the
gateway tests exercise the real SavedModel path without training anything big.

- ``tiny_classifier``: conv/BN/ReLU x2 -> pooling -> 3 logits, 32x32 stretch input.
- ``tiny_detector``: conv/BN -> pooling -> 3 fixed box slots, 40x40 letterbox input.
  Its boxes are constants in model-input space and its scores come from the
  biases (weights zero), so tests know exactly what it detects:
  slot 0 ``triangle`` 0.9 at DETECTOR_BOXES[0], slot 1 ``circle`` 0.6, slot 2
  ``square`` 0.2.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from contract.bn import select_probe_layers  # noqa: E402
from contract.export import ExportResult, export_model, pixel_statistics  # noqa: E402
from contract.preprocessing import PreprocessSpec, normalize  # noqa: E402
from training.classifier import classifier_postprocess  # noqa: E402

CLASSIFIER = "tiny_classifier"
DETECTOR = "tiny_detector"
CLASSIFIER_LABELS = ["red", "green", "blue"]
DETECTOR_LABELS = ["circle", "square", "triangle"]
CLASSIFIER_SPEC = PreprocessSpec(height=32, width=32)
DETECTOR_SPEC = PreprocessSpec(height=40, width=40, geometry="letterbox", pad_value=114)
#: Normalised (ymin, xmin, ymax, xmax) in model-input space, per detector slot.
DETECTOR_BOXES = np.array(
    [[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4]], np.float32
)
#: (class index, score) per detector slot.
DETECTOR_SLOTS = [(2, 0.9), (0, 0.6), (1, 0.2)]


def _sample_pixels(spec: PreprocessSpec, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, spec.height, spec.width, 3), dtype=np.uint8)


def _conv_bn(x, filters: int, name: str):
    x = keras.layers.Conv2D(
        filters, 3, strides=2, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_classifier(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((CLASSIFIER_SPEC.height, CLASSIFIER_SPEC.width, 3), name="images")
    x = _conv_bn(inp, 4, "block1")
    x = _conv_bn(x, 8, "block2")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(len(CLASSIFIER_LABELS), name="logits")(x)
    model = keras.Model(inp, out, name="tiny_classifier")
    # Non-trivial moving statistics, so the probe reference is not the initial 0/1.
    model(normalize(_sample_pixels(CLASSIFIER_SPEC, 8, seed), CLASSIFIER_SPEC), training=True)
    return model


def export_classifier(
    model_base: str | os.PathLike[str], *, seed: int = 0, labels=("stable",)
) -> ExportResult:
    """Export a tiny classifier as the next version of ``tiny_classifier``."""
    model = build_classifier(seed)
    warm = normalize(_sample_pixels(CLASSIFIER_SPEC, 2, seed + 1), CLASSIFIER_SPEC)
    return export_model(
        model,
        model_base=model_base,
        name=CLASSIFIER,
        task="classification",
        spec=CLASSIFIER_SPEC,
        labels=CLASSIFIER_LABELS,
        postprocess=classifier_postprocess(1.0),
        probe_layers=select_probe_layers(model, 2),
        card_fields={"bn_reference": {"pixel_stats": pixel_statistics(warm)}},
        warmup_images=warm,
        version_labels=labels,
    )


def build_detector() -> keras.Model:
    keras.utils.set_random_seed(1)
    inp = keras.Input((DETECTOR_SPEC.height, DETECTOR_SPEC.width, 3), name="images")
    x = _conv_bn(inp, 4, "block1")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    slots, classes = len(DETECTOR_SLOTS), len(DETECTOR_LABELS)
    head = keras.layers.Dense(slots * classes, name="head")
    logits = head(x)
    # Zero weights and chosen biases: the scores do not depend on the image.
    bias = np.full((slots, classes), -8.0, np.float32)
    for slot, (cls, score) in enumerate(DETECTOR_SLOTS):
        bias[slot, cls] = np.log(score / (1 - score))
    head.set_weights([np.zeros_like(head.get_weights()[0]), bias.reshape(-1)])
    return keras.Model(inp, logits, name="tiny_detector")


def _detector_postprocess(outs: list[tf.Tensor]) -> dict[str, tf.Tensor]:
    logits = outs[0]
    batch = tf.shape(logits)[0]
    scores_all = tf.sigmoid(tf.reshape(logits, [-1, len(DETECTOR_SLOTS), len(DETECTOR_LABELS)]))
    boxes = tf.tile(tf.constant(DETECTOR_BOXES)[None], [batch, 1, 1])
    return {
        "detection_boxes": boxes,
        "detection_scores": tf.reduce_max(scores_all, -1),
        "detection_classes": tf.cast(tf.argmax(scores_all, -1), tf.float32),
        "num_detections": tf.fill([batch], float(len(DETECTOR_SLOTS))),
    }


def export_detector(model_base: str | os.PathLike[str]) -> ExportResult:
    """Export the tiny detector as the next version of ``tiny_detector``."""
    model = build_detector()
    warm = normalize(_sample_pixels(DETECTOR_SPEC, 2, 5), DETECTOR_SPEC)
    nms = {
        "iou_threshold": 0.5,
        "score_threshold": 0.05,
        "max_detections": len(DETECTOR_SLOTS),
        "max_detections_per_class": len(DETECTOR_SLOTS),
    }
    return export_model(
        model,
        model_base=model_base,
        name=DETECTOR,
        task="detection",
        spec=DETECTOR_SPEC,
        labels=DETECTOR_LABELS,
        postprocess=_detector_postprocess,
        probe_layers=select_probe_layers(model, 1),
        card_fields={
            "bn_reference": {"pixel_stats": pixel_statistics(warm)},
            "detection": {"nms": nms},
        },
        warmup_images=warm,
    )


def build_repository(model_base: str | os.PathLike[str]) -> Path:
    """A model base with ``tiny_classifier`` v1 and ``tiny_detector`` v1, both ``stable``."""
    export_classifier(model_base)
    export_detector(model_base)
    return Path(model_base)


HEAVY = "heavy_classifier"
HEAVY_SPEC = PreprocessSpec(height=64, width=64)


def export_heavy_classifier(model_base: str | os.PathLike[str]) -> ExportResult:
    """A classifier with full-resolution convolutions (~150 MFLOPs per image): saturable in tests."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((HEAVY_SPEC.height, HEAVY_SPEC.width, 3), name="images")
    x = inp
    for i in range(3):
        x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name=f"heavy{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"heavy{i}_bn")(x)
        x = keras.layers.ReLU(name=f"heavy{i}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inp, keras.layers.Dense(len(CLASSIFIER_LABELS), name="logits")(x))
    warm = normalize(_sample_pixels(HEAVY_SPEC, 2, 7), HEAVY_SPEC)
    return export_model(
        model,
        model_base=model_base,
        name=HEAVY,
        task="classification",
        spec=HEAVY_SPEC,
        labels=CLASSIFIER_LABELS,
        postprocess=classifier_postprocess(1.0),
        probe_layers=select_probe_layers(model, 2),
        card_fields={"bn_reference": {"pixel_stats": pixel_statistics(warm)}},
        warmup_images=warm,
    )
