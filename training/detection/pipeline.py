"""The training input pipeline: augment -> shared preprocessing -> anchor targets -> batches.

Per example: :func:`training.detection.augment.augment` on the decoded pixels
(boxes moved into a drafted decode's pixels first), the final resize/normalise by
:mod:`contract.preprocessing` (as serving does), then
:func:`training.detection.matching.match_anchors`. Images decoded for the model
input (:meth:`training.detection.data.DetectionDataset.decode_usable` with the
spec) and not augmented give the gateway's tensor and geometry exactly. Batches are built in
NumPy by a generator that ``tf.data`` prefetches, so the next batch is prepared
while the current training step runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from contract.preprocessing import PreprocessSpec
from training.detection.augment import (
    NO_AUGMENT,
    AugmentConfig,
    augment,
    decoded_frame,
    to_model_input,
)
from training.detection.boxes import DEFAULT_VARIANCES
from training.detection.data import DetectionDataset, DetectionImage
from training.detection.matching import MatchConfig, match_anchors


@dataclass
class Example:
    """One encoded training example."""

    x: np.ndarray  # [H, W, 3] float32 model input
    labels: np.ndarray  # [A] int32 (-1 ignore, 0 background, k + 1)
    box_targets: np.ndarray  # [A, 4] float32


def encode_example(
    pixels: DetectionImage,
    boxes: np.ndarray,
    classes: np.ndarray,
    *,
    spec: PreprocessSpec,
    anchors: np.ndarray,
    match: MatchConfig,
    augment_config: AugmentConfig,
    rng: np.random.Generator,
    variances: Sequence[float] = DEFAULT_VARIANCES,
) -> Example:
    """Augment (if configured), preprocess and assign anchor targets for one image
    (``boxes`` in its original pixels)."""
    if augment_config != NO_AUGMENT:
        pixels, boxes = decoded_frame(pixels, boxes)
        pixels, boxes, classes = augment(pixels, boxes, classes, rng, augment_config)
    x, norm_boxes, _ = to_model_input(pixels, boxes, spec)
    # Boxes squeezed to nothing by clipping cannot be learned from.
    keep = (norm_boxes[:, 2] - norm_boxes[:, 0] > 1e-3) & (
        norm_boxes[:, 3] - norm_boxes[:, 1] > 1e-3
    )
    result = match_anchors(anchors, norm_boxes[keep], np.asarray(classes)[keep], match, variances)
    return Example(x, result.labels, result.box_targets)


class TrainingBatches:
    """Shuffled, augmented, encoded batches over a dataset whose images are in memory."""

    def __init__(
        self,
        dataset: DetectionDataset,
        images: Sequence[DetectionImage],
        *,
        spec: PreprocessSpec,
        anchors: np.ndarray,
        match: MatchConfig,
        augment_config: AugmentConfig,
        batch_size: int,
        seed: int = 0,
        variances: Sequence[float] = DEFAULT_VARIANCES,
    ) -> None:
        if len(images) != len(dataset):
            raise ValueError(f"{len(images)} images for {len(dataset)} samples")
        if batch_size < 1 or batch_size > len(dataset):
            raise ValueError(f"batch_size must be in [1, {len(dataset)}], got {batch_size}")
        self.dataset, self.images = dataset, list(images)
        self.spec, self.anchors, self.match = spec, np.asarray(anchors, np.float32), match
        self.augment_config, self.batch_size, self.seed = augment_config, batch_size, seed
        self.variances = tuple(variances)
        # Crowd regions are not objects to learn one box for.
        self._targets = [(s.boxes[~s.crowd], s.classes[~s.crowd]) for s in dataset.samples]

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch (the remainder is dropped: one static shape, one trace)."""
        return len(self.images) // self.batch_size

    def batches(self, epochs: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(x, labels, box_targets)`` batches for ``epochs`` passes, reshuffled each pass."""
        rng = np.random.default_rng(self.seed)
        for _ in range(epochs):
            order = rng.permutation(len(self.images))
            for b in range(self.steps_per_epoch):
                idx = order[b * self.batch_size : (b + 1) * self.batch_size]
                examples = [
                    encode_example(
                        self.images[i],
                        *self._targets[i],
                        spec=self.spec,
                        anchors=self.anchors,
                        match=self.match,
                        augment_config=self.augment_config,
                        rng=rng,
                        variances=self.variances,
                    )
                    for i in idx
                ]
                yield (
                    np.stack([e.x for e in examples]),
                    np.stack([e.labels for e in examples]),
                    np.stack([e.box_targets for e in examples]),
                )

    def tf_dataset(self, epochs: int, *, prefetch: int = 2) -> tf.data.Dataset:
        """The batches as a prefetching ``tf.data.Dataset``."""
        a = len(self.anchors)
        signature = (
            tf.TensorSpec((self.batch_size, self.spec.height, self.spec.width, 3), tf.float32),
            tf.TensorSpec((self.batch_size, a), tf.int32),
            tf.TensorSpec((self.batch_size, a, 4), tf.float32),
        )
        ds = tf.data.Dataset.from_generator(
            lambda: self.batches(epochs), output_signature=signature
        )
        return ds.prefetch(prefetch)


def image_batches(
    images: Sequence[DetectionImage], spec: PreprocessSpec, batch_size: int
) -> Iterator[np.ndarray]:
    """Un-augmented preprocessed images in batches (precise BN, pixel statistics)."""
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        yield np.stack([to_model_input(p, np.zeros((0, 4)), spec)[0] for p in chunk])
