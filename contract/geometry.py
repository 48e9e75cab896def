"""Where an original image lies in the model input: the one letterbox/stretch arithmetic.

:func:`contract.preprocessing.resize` returns an :class:`ImageGeometry` per image. The
gateway maps a detector's boxes back to original pixels with it
(:meth:`ImageGeometry.boxes_to_original`), box feedback maps a client's original-pixel
boxes into the captured model input with its inverse (:meth:`ImageGeometry.boxes_to_input`),
and capture shards keep it as eight numbers (:meth:`ImageGeometry.to_array`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageGeometry:
    """How an original image maps into the model input (for undoing the resize).

    A point (x, y) in model-input pixels is ``((x - pad_x) / scale_x,
    (y - pad_y) / scale_y)`` in original pixels.
    """

    original_height: int
    original_width: int
    scale_y: float
    scale_x: float
    pad_y: float
    pad_x: float
    input_height: int
    input_width: int

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Normalised (ymin, xmin, ymax, xmax) in model input -> original pixel (same order).

        Coordinates are clipped to the original image.
        """
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        y = (b[:, [0, 2]] * self.input_height - self.pad_y) / self.scale_y
        x = (b[:, [1, 3]] * self.input_width - self.pad_x) / self.scale_x
        y = np.clip(y, 0, self.original_height)
        x = np.clip(x, 0, self.original_width)
        return np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Original-pixel (ymin, xmin, ymax, xmax) -> model-input pixels (same order).

        The inverse of :meth:`boxes_to_original` (times the input size): ``y * scale_y
        + pad_y`` and ``x * scale_x + pad_x``. No clipping: a box inside the original
        image lands inside the resized image (never on letterbox padding).
        """
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        y = b[:, [0, 2]] * self.scale_y + self.pad_y
        x = b[:, [1, 3]] * self.scale_x + self.pad_x
        return np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)

    def to_array(self) -> np.ndarray:
        """The fields as float64 ``[8]``, in declaration order (how capture shards keep them)."""
        return np.array([getattr(self, f.name) for f in dataclasses.fields(self)], np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray | Any) -> ImageGeometry:
        """The geometry :meth:`to_array` wrote; ValueError for anything but 8 finite numbers."""
        v = np.asarray(a, dtype=np.float64).reshape(-1)
        if v.shape != (8,) or not np.isfinite(v).all():
            raise ValueError(f"an image geometry is 8 finite numbers, got {v.tolist()}")
        names = [f.name for f in dataclasses.fields(cls)]
        kw: dict[str, Any] = dict(zip(names, v.tolist(), strict=True))
        for name in ("original_height", "original_width", "input_height", "input_width"):
            kw[name] = int(round(kw[name]))
        return cls(**kw)
