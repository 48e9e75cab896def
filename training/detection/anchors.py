"""Anchor boxes: one set per feature level, scales and aspect ratios configurable.

Level ``k`` has stride ``s_k`` (input pixels per feature-map cell) and a base
size ``size_factor * s_k`` pixels; each cell carries ``len(scales) *
len(aspect_ratios)`` anchors of size ``base * scale`` with width/height ratio
``r`` (``h = size / sqrt(r)``, ``w = size * sqrt(r)``), centred on the cell.

Order (the model's prediction order must match): level, then row, then column,
then scale, then aspect ratio. Anchors are normalised corner boxes
``(ymin, xmin, ymax, xmax)`` and are not clipped to the image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AnchorConfig:
    """Anchor layout; recorded in the model card under ``detection.anchors``."""

    strides: tuple[int, ...] = (8, 16, 32, 64)
    size_factor: float = 1.5
    scales: tuple[float, ...] = (1.0, 2**0.5)
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5)

    def __post_init__(self) -> None:
        if not self.strides or any(s < 1 for s in self.strides):
            raise ValueError(f"strides must be positive integers, got {self.strides}")
        if list(self.strides) != sorted(set(self.strides)):
            raise ValueError(f"strides must be strictly increasing, got {self.strides}")
        if any(s & (s - 1) for s in self.strides):
            raise ValueError(f"strides must be powers of two, got {self.strides}")
        if self.size_factor <= 0 or not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError("size_factor and scales must be positive")
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise ValueError("aspect_ratios must be positive")

    @property
    def anchors_per_location(self) -> int:
        return len(self.scales) * len(self.aspect_ratios)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnchorConfig:
        return cls(
            strides=tuple(int(s) for s in d["strides"]),
            size_factor=float(d["size_factor"]),
            scales=tuple(float(s) for s in d["scales"]),
            aspect_ratios=tuple(float(r) for r in d["aspect_ratios"]),
        )


def feature_map_sizes(
    config: AnchorConfig, image_height: int, image_width: int
) -> list[tuple[int, int]]:
    """``(rows, cols)`` of each level: ``ceil(size / stride)``, as 'same'-padded stride-2 convs give."""
    if image_height < 1 or image_width < 1:
        raise ValueError(f"image size must be positive, got {image_height}x{image_width}")
    return [(math.ceil(image_height / s), math.ceil(image_width / s)) for s in config.strides]


def generate_anchors(config: AnchorConfig, image_height: int, image_width: int) -> np.ndarray:
    """All anchors, ``[A, 4]`` float32 normalised corner boxes, in prediction order."""
    per_level = []
    for stride, (rows, cols) in zip(
        config.strides, feature_map_sizes(config, image_height, image_width), strict=True
    ):
        sizes = []
        for scale in config.scales:
            for ratio in config.aspect_ratios:
                size = config.size_factor * stride * scale
                sizes.append((size / math.sqrt(ratio), size * math.sqrt(ratio)))
        hw = np.asarray(sizes, dtype=np.float64)  # [k, 2] pixels
        cy = (np.arange(rows, dtype=np.float64) + 0.5) * stride
        cx = (np.arange(cols, dtype=np.float64) + 0.5) * stride
        cyy, cxx = np.meshgrid(cy, cx, indexing="ij")  # [rows, cols]
        centres = np.stack([cyy, cxx], axis=-1)[:, :, None, :]  # [rows, cols, 1, 2]
        half = hw[None, None, :, :] / 2
        lo = centres - half
        hi = centres + half
        boxes = np.concatenate([lo, hi], axis=-1).reshape(-1, 4)
        per_level.append(boxes)
    anchors = np.concatenate(per_level, axis=0)
    anchors /= np.array([image_height, image_width, image_height, image_width], dtype=np.float64)
    return anchors.astype(np.float32)


def num_anchors(config: AnchorConfig, image_height: int, image_width: int) -> int:
    """How many anchors :func:`generate_anchors` returns for this input size."""
    return sum(r * c for r, c in feature_map_sizes(config, image_height, image_width)) * (
        config.anchors_per_location
    )
