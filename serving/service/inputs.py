"""Request inputs -> the float32 batch a model version takes.

Encoded images are decoded and preprocessed with ``contract.preprocessing``,
configured by the version's model card; a tensor that is already preprocessed
(the Open Inference Protocol's ``input``) is checked against the same card.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract.preprocessing import ImageError, decode_image, decode_pixels, preprocess_pixels
from serving.catalog import ModelVersion
from serving.errors import ImageRejected, InvalidParameter, PreprocessTimeout
from serving.service.worker_pixels import WorkerPixelLimit
from serving.settings import Settings


@dataclass
class StageTiming:
    """Seconds spent per request stage (decode, preprocess, queue, ...), summed."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage``."""
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


def preprocess_images(
    mv: ModelVersion,
    images: Sequence[bytes],
    pixels: Sequence[int],
    settings: Settings,
    worker_pixels: WorkerPixelLimit,
    timing: StageTiming,
    deadline: float,
) -> tuple[np.ndarray, list[Any]]:
    """The batch [n, H, W, 3] and each image's geometry (for boxes in original pixels).

    ``pixels`` are the images' header pixel counts; each decode reserves the pixels it
    will hold (:func:`contract.preprocessing.decode_pixels`) of the worker's
    decoded-pixel budget until its image is preprocessed (503 if they do not fit).
    """
    spec = mv.spec
    inputs = np.empty((len(images), spec.height, spec.width, 3), np.float32)
    geometries = []
    for i, data in enumerate(images):
        # A decode cannot be interrupted, so the deadline is checked before each one:
        # a late request stops here instead of decoding the rest for nobody.
        if time.monotonic() >= deadline:
            raise PreprocessTimeout(
                f"deadline passed after {i} of {len(images)} images were decoded",
                retry_after=settings.retry_after_s,
            )
        t0 = time.perf_counter()
        # The decoded image lives until it is preprocessed: that is what it reserves (a
        # photo-sized JPEG decode holds its drafted pixels, not the full image's).
        with worker_pixels.reserve(decode_pixels(data, spec, header=pixels[i])):
            try:
                decoded = decode_image(
                    data,
                    max_pixels=settings.max_image_pixels,
                    multi_frame=settings.multi_frame,
                    spec=spec,
                )
            except ImageError as exc:
                raise ImageRejected(exc, i if len(images) > 1 else None) from exc
            t1 = time.perf_counter()
            # The decoded image itself (no pixel array in between), written into the batch.
            _, geometry = preprocess_pixels(decoded, spec, out=inputs[i])
            del decoded
        geometries.append(geometry)
        timing.add("decode", t1 - t0)
        timing.add("preprocess", time.perf_counter() - t1)
    return inputs, geometries


def checked_tensor(mv: ModelVersion, inputs: np.ndarray) -> np.ndarray:
    """``inputs`` as the version's float32 batch; 400 unless its shape is [n, H, W, 3]."""
    spec = mv.spec
    expected = (spec.height, spec.width, 3)
    if inputs.ndim != 4 or inputs.shape[1:] != expected:
        raise InvalidParameter(
            f"{mv.name}/{mv.version} takes preprocessed input of shape "
            f"[-1, {', '.join(map(str, expected))}], got {list(inputs.shape)}"
        )
    if not np.all(np.isfinite(inputs)):
        raise InvalidParameter("preprocessed input holds NaN or infinite values")
    return np.ascontiguousarray(inputs, np.float32)
