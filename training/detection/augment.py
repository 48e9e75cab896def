"""Training augmentation for detection: pixels and boxes transformed together.

Applied to decoded RGB uint8 images at their native size, in this order:

1. horizontal flip;
2. random crop with an IoU constraint (SSD): a minimum IoU is drawn from
   ``crop_min_ious`` and crops are sampled until one overlaps some ground-truth
   box by at least that much; boxes keep the part inside the crop and are
   dropped when less than ``min_visible`` of them remains;
3. scale jitter: a zoom factor ``s`` from ``scale_jitter``; ``s < 1`` places the
   image on a larger mean-coloured canvas (objects get smaller), ``s > 1`` crops a
   window ``1/s`` of the size (objects get larger);
4. photometric changes: brightness, contrast, saturation;
5. the final resize and normalise by :mod:`contract.preprocessing` (the same
   code serving runs), whose geometry maps the boxes into the model input.

An image decoded for the model input may be drafted (photo-sized decoding): its
pixels are smaller than the original ones its boxes are in. Augmentation works on
the decoded pixels, so :func:`decoded_frame` first scales the boxes into them; an
image that is not augmented goes to :func:`to_model_input` as decoded, whose
geometry then is the gateway's (in original pixels).

Everything draws from the ``numpy.random.Generator`` it is given: a seed
reproduces a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from contract.preprocessing import DecodedImage, ImageGeometry, PreprocessSpec, normalize, resize
from training.detection.boxes import area, pixel_boxes_to_input


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; recorded in the model card's training parameters."""

    flip_probability: float = 0.5
    crop_probability: float = 0.3
    crop_min_ious: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # crop side as a fraction of the image side
    crop_max_aspect_change: float = 1.5  # crop (h/w) / image (h/w) within [1/x, x]
    min_visible: float = 0.5  # keep a cut box only if this fraction of its area remains
    jitter_probability: float = 0.3
    scale_jitter: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.12  # additive, as a fraction of 255
    contrast: tuple[float, float] = (0.75, 1.25)
    saturation: tuple[float, float] = (0.7, 1.3)

    def __post_init__(self) -> None:
        for name in ("flip_probability", "crop_probability", "jitter_probability", "min_visible"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        lo, hi = self.scale_jitter
        if not 0.0 < lo <= hi:
            raise ValueError("scale_jitter must satisfy 0 < low <= high")
        if self.crop_max_aspect_change < 1.0:
            raise ValueError("crop_max_aspect_change must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


#: No augmentation at all (evaluation, precise BN, tests).
NO_AUGMENT = AugmentConfig(
    flip_probability=0.0,
    crop_probability=0.0,
    jitter_probability=0.0,
    brightness=0.0,
    contrast=(1.0, 1.0),
    saturation=(1.0, 1.0),
)


def flip_horizontal(pixels: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror the image left-right; pixel boxes ``(ymin, xmin, ymax, xmax)`` follow."""
    w = pixels.shape[1]
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    flipped = np.stack([b[:, 0], w - b[:, 3], b[:, 2], w - b[:, 1]], axis=1)
    return np.ascontiguousarray(pixels[:, ::-1]), flipped


def crop(
    pixels: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    window: tuple[int, int, int, int],
    *,
    min_visible: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut ``window`` = (top, left, bottom, right) out; boxes clipped, mostly-cut ones dropped."""
    top, left, bottom, right = window
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    clipped = np.stack(
        [
            np.clip(b[:, 0], top, bottom),
            np.clip(b[:, 1], left, right),
            np.clip(b[:, 2], top, bottom),
            np.clip(b[:, 3], left, right),
        ],
        axis=1,
    )
    full = area(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        visible = np.where(full > 0, area(clipped) / full, 0.0)
    keep = visible >= max(min_visible, 1e-6)
    shifted = clipped[keep] - np.array([top, left, top, left], np.float32)
    return pixels[top:bottom, left:right], shifted, np.asarray(classes)[keep]


def _box_iou_with_window(boxes: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    top, left, bottom, right = window
    ih = np.clip(np.minimum(boxes[:, 2], bottom) - np.maximum(boxes[:, 0], top), 0, None)
    iw = np.clip(np.minimum(boxes[:, 3], right) - np.maximum(boxes[:, 1], left), 0, None)
    inter = ih * iw
    union = area(boxes) + (bottom - top) * (right - left) - inter
    return inter / np.maximum(union, 1e-9)


def random_iou_crop(
    pixels: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig,
    *,
    attempts: int = 30,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSD's random crop: a window whose IoU with some box is >= a drawn minimum.

    Returns the input unchanged when no window satisfies the constraint (or there
    are no boxes), so the image is never left without objects by accident.
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(b) == 0:
        return pixels, b, np.asarray(classes)
    h, w = pixels.shape[:2]
    min_iou = float(rng.choice(config.crop_min_ious))
    lo, hi = config.crop_scale
    for _ in range(attempts):
        ch = int(round(h * rng.uniform(lo, hi)))
        cw = int(round(w * rng.uniform(lo, hi)))
        if ch < 8 or cw < 8:
            continue
        change = (ch / cw) / (h / w)
        if not 1 / config.crop_max_aspect_change <= change <= config.crop_max_aspect_change:
            continue
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        window = (top, left, top + ch, left + cw)
        if _box_iou_with_window(b, window).max() < min_iou:
            continue
        out = crop(pixels, b, classes, window, min_visible=config.min_visible)
        if len(out[1]):
            return out
    return pixels, b, np.asarray(classes)


def scale_jitter(
    pixels: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zoom out (canvas) or in (window) by a factor drawn from ``config.scale_jitter``."""
    s = float(rng.uniform(*config.scale_jitter))
    h, w = pixels.shape[:2]
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if s < 1.0:
        ch, cw = int(round(h / s)), int(round(w / s))
        top, left = int(rng.integers(0, ch - h + 1)), int(rng.integers(0, cw - w + 1))
        fill = pixels.reshape(-1, 3).mean(0).astype(np.uint8)
        canvas = np.empty((ch, cw, 3), np.uint8)
        canvas[:] = fill
        canvas[top : top + h, left : left + w] = pixels
        return canvas, b + np.array([top, left, top, left], np.float32), np.asarray(classes)
    if s > 1.0:
        ch, cw = max(8, int(round(h / s))), max(8, int(round(w / s)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = crop(
            pixels, b, classes, (top, left, top + ch, left + cw), min_visible=config.min_visible
        )
        if len(out[1]) or not len(b):
            return out
    return pixels, b, np.asarray(classes)


def photometric(pixels: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Brightness, contrast and saturation changes; uint8 in, uint8 out."""
    x = pixels.astype(np.float32)
    if config.brightness > 0:
        x += float(rng.uniform(-config.brightness, config.brightness)) * 255.0
    c = float(rng.uniform(*config.contrast))
    if c != 1.0:
        x = (x - x.mean()) * c + x.mean()
    s = float(rng.uniform(*config.saturation))
    if s != 1.0:
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = grey[..., None] + (x - grey[..., None]) * s
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment(
    pixels: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip, IoU crop, scale jitter and photometric changes (native pixels and boxes)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    c = np.asarray(classes)
    if rng.random() < config.flip_probability:
        pixels, b = flip_horizontal(pixels, b)
    if rng.random() < config.crop_probability:
        pixels, b, c = random_iou_crop(pixels, b, c, rng, config)
    if rng.random() < config.jitter_probability:
        pixels, b, c = scale_jitter(pixels, b, c, rng, config)
    if config.brightness > 0 or config.contrast != (1.0, 1.0) or config.saturation != (1.0, 1.0):
        pixels = photometric(pixels, rng, config)
    return pixels, b, c


def decoded_frame(
    image: np.ndarray | DecodedImage, boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The image's decoded RGB uint8 pixels and ``boxes`` (original pixels) scaled into them.

    Only a drafted decode moves the boxes: the decoded image spans the whole original
    one (as the gateway's resize takes it), so each axis scales by decoded / original.
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not isinstance(image, DecodedImage):
        return image, b
    # Not the cached ``image.pixels``: a training set then keeps one copy of each image.
    pixels = np.asarray(image.image, dtype=np.uint8)
    (w, h), (dw, dh) = image.size, image.image.size
    if (dw, dh) != (w, h):
        b = b * np.array([dh / h, dw / w, dh / h, dw / w], np.float32)
    return pixels, b


def to_model_input(
    pixels: np.ndarray | DecodedImage, boxes: np.ndarray, spec: PreprocessSpec
) -> tuple[np.ndarray, np.ndarray, ImageGeometry]:
    """The final step, shared with serving: resize + normalise by the spec.

    ``pixels``: RGB uint8 with ``boxes`` in its pixels, or a :class:`DecodedImage` as
    decoded (boxes in its full upright size, which the geometry then refers to).
    Returns the float32 model input, the boxes normalised to it (clipped to
    [0, 1]) and the geometry (which maps predictions back to original pixels).
    """
    resized, geometry = resize(pixels, spec)
    x = normalize(resized, spec)
    b = np.clip(pixel_boxes_to_input(np.asarray(boxes, np.float32).reshape(-1, 4), geometry), 0, 1)
    return x, b, geometry
