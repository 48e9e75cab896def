"""The labelled reference set a detector version ships, and its COCO evaluation.

A detector version carries ``assets.extra/reference_set.npz`` (the classifier
ships one too): held-out images as the model sees them (``resize`` output:
uint8, letterboxed to the input size) with their ground-truth boxes in
model-input pixels. Calibration scores the parent and each candidate on it
with pycocotools and gates on mAP; it needs nothing but the version itself.

Arrays: ``pixels`` ``[N, H, W, 3]`` uint8; ``box_image`` ``[M]`` (which image a
box belongs to), ``boxes`` ``[M, 4]`` float32 ``(ymin, xmin, ymax, xmax)``
in model-input pixels, ``classes`` ``[M]`` 0-based label index, ``crowd``
``[M]`` bool; ``category_ids`` ``[K]`` (the COCO id of each label).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from contract.preprocessing import ImageGeometry, PreprocessSpec, normalize, resize
from training.detection.data import DetectionDataset, DetectionImage, DetectionSample
from training.detection.evaluate import (
    DetectionMetrics,
    Postprocess,
    coco_metrics,
    detections_to_coco,
    predict,
)

#: File name under ``assets.extra`` (the same as the classifier's).
REFERENCE_SET = "reference_set.npz"


@dataclass
class ReferenceSet:
    """Model-input images and their boxes, as a dataset pycocotools can score."""

    x: np.ndarray  # [N, H, W, 3] float32, normalised as served
    dataset: DetectionDataset  # boxes in model-input pixels; "images" of the input size

    def __len__(self) -> int:
        return len(self.x)


def reference_set_bytes(
    dataset: DetectionDataset,
    images: list[DetectionImage],
    spec: PreprocessSpec,
    count: int,
    seed: int = 0,
) -> bytes:
    """``count`` images of ``dataset`` (decoded ``images``) resized as served, boxes mapped in."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(dataset))[: min(count, len(dataset))])
    pixels, box_image, boxes, classes, crowd = [], [], [], [], []
    for j, i in enumerate(idx):
        sample = dataset.samples[int(i)]
        resized, geom = resize(images[int(i)], spec)
        pixels.append(resized)
        b = np.asarray(sample.boxes, dtype=np.float64).reshape(-1, 4)
        boxes.append(geom.boxes_to_input(b))
        classes.append(np.asarray(sample.classes, dtype=np.int64))
        crowd.append(np.asarray(sample.crowd, dtype=bool))
        box_image.append(np.full(len(b), j, dtype=np.int64))
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        pixels=np.stack(pixels).astype(np.uint8),
        box_image=np.concatenate(box_image),
        boxes=np.concatenate(boxes).astype(np.float32),
        classes=np.concatenate(classes),
        crowd=np.concatenate(crowd),
        category_ids=np.asarray(dataset.category_ids, dtype=np.int64),
    )
    return buf.getvalue()


def load_reference_set(path: str | Path, spec: PreprocessSpec, labels: list[str]) -> ReferenceSet:
    """Read a reference set written by :func:`reference_set_bytes`."""
    with np.load(path) as ref:
        pixels = ref["pixels"]
        box_image, boxes = ref["box_image"], ref["boxes"]
        classes, crowd = ref["classes"], ref["crowd"]
        category_ids = [int(c) for c in ref["category_ids"]]
    if len(category_ids) != len(labels):
        raise ValueError(
            f"reference set has {len(category_ids)} categories for {len(labels)} labels"
        )
    h, w = int(pixels.shape[1]), int(pixels.shape[2])
    samples = [
        DetectionSample(
            image_id=i + 1,
            path=Path(f"reference/{i}"),
            height=h,
            width=w,
            boxes=boxes[box_image == i].astype(np.float32),
            classes=classes[box_image == i].astype(np.int64),
            crowd=crowd[box_image == i].astype(bool),
        )
        for i in range(len(pixels))
    ]
    dataset = DetectionDataset(list(labels), category_ids, samples, source=str(path))
    return ReferenceSet(normalize(pixels, spec), dataset)


def evaluate_reference(
    model: keras.Model,
    postprocess: Postprocess,
    ref: ReferenceSet,
    *,
    batch_size: int = 32,
) -> DetectionMetrics:
    """COCO metrics of ``model`` (inference mode) on the reference set, in model-input pixels."""
    return score_outputs(predict(model, postprocess, ref.x, batch_size=batch_size), ref.dataset)


def score_outputs(outputs: dict[str, np.ndarray], dataset: DetectionDataset) -> DetectionMetrics:
    """COCO metrics of signature outputs on ``dataset``, whose images are model inputs.

    Its boxes are in model-input pixels, so the outputs' normalised boxes map to
    them by the input size alone (no resize to undo).
    """
    identity = [
        ImageGeometry(s.height, s.width, 1.0, 1.0, 0.0, 0.0, s.height, s.width)
        for s in dataset.samples
    ]
    dets = detections_to_coco(
        [s.image_id for s in dataset.samples], outputs, identity, dataset.category_ids
    )
    return coco_metrics(dataset.to_coco(), dets, dataset.labels)


def describe(ref_bytes: bytes) -> dict[str, Any]:
    """The card's ``reference_set`` entry for a reference set's bytes."""
    with np.load(io.BytesIO(ref_bytes)) as ref:
        return {
            "file": REFERENCE_SET,
            "images": int(len(ref["pixels"])),
            "boxes": int((~ref["crowd"]).sum()),
            "coordinates": "model-input pixels (ymin, xmin, ymax, xmax)",
            "pixels": "resized as served (uint8, before normalisation)",
        }
