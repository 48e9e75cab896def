"""A seeded synthetic classification dataset: shapes on varied backgrounds.

The class is the shape; colour, size, position, rotation, aspect, background,
clutter and noise vary independently of it, so a model must learn shape. Images
have varied native sizes (not the model's), so resizing is exercised. The same
seed always gives the same pixels.

Background colours lean light (each channel 255 x Beta(2.5, 1.2), mean 0.68),
as walls, skies and paper do in photographs; shape and clutter colours are
uniform. A palette that is uniform everywhere would be symmetric under colour
inversion (255 - x maps it onto itself), so inverted images would be drawn from
the training distribution itself and no input statistic could tell them apart.

``background`` selects the domain: the default mix (solid, gradient, noise) is
the training domain; ``checker`` and ``stripes`` are different domains used to
test drift detection and calibration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")
TRAINING_BACKGROUNDS = ("solid", "gradient", "noise")
ALL_BACKGROUNDS = (*TRAINING_BACKGROUNDS, "checker", "stripes")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    """A background colour, light-leaning: per channel 255 x Beta(2.5, 1.2)."""
    return np.rint(255 * rng.beta(2.5, 1.2, 3))


def distinct_colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least 100 (L1) from ``avoid``, so a shape stays visible."""
    for _ in range(100):
        c = np.array(_colour(rng))
        if np.abs(c - avoid).sum() >= 100:
            return tuple(int(v) for v in c)
    return tuple(int(v) for v in (255 - avoid))


def background_pixels(rng: np.random.Generator, kind: str, w: int, h: int) -> np.ndarray:
    """A float (h, w, 3) background of one of ``ALL_BACKGROUNDS``' kinds."""
    a, b = _background_colour(rng), _background_colour(rng)
    if kind == "solid":
        img = np.broadcast_to(a, (h, w, 3)).copy()
    elif kind == "gradient":
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
        t = t[None, :, None] if len(t) == w else t[:, None, None]
        img = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).copy()
    elif kind == "noise":
        coarse = rng.random((max(2, h // 16), max(2, w // 16), 1))
        coarse = np.asarray(Image.fromarray((coarse[..., 0] * 255).astype(np.uint8)).resize((w, h)))
        t = coarse[..., None] / 255.0
        img = a * (1 - t) + b * t
    elif kind == "checker":
        cell = int(rng.integers(6, 16))
        yy, xx = np.mgrid[0:h, 0:w]
        t = (((yy // cell) + (xx // cell)) % 2)[..., None].astype(float)
        img = a * (1 - t) + b * t
    elif kind == "stripes":
        period = int(rng.integers(6, 14))
        xx = np.arange(w)[None, :, None]
        t = ((xx // period) % 2).astype(float)
        img = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).copy()
    else:
        raise ValueError(f"unknown background {kind!r}; choose from {ALL_BACKGROUNDS}")
    return img


def _polygon(cx: float, cy: float, r: float, angle: float, points: Sequence[tuple[float, float]]):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def draw_shape(draw: ImageDraw.ImageDraw, cls: str, cx, cy, r, angle, colour, bg) -> None:
    """Draw shape class ``cls`` centred at (cx, cy), radius r, rotated by ``angle`` radians."""
    if cls == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif cls == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=bg)
    elif cls == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
        draw.polygon(_polygon(cx, cy, r, angle, pts), fill=colour)
    elif cls == "triangle":
        pts = [(0, -1), (0.87, 0.5), (-0.87, 0.5)]
        draw.polygon(_polygon(cx, cy, r, angle, pts), fill=colour)
    elif cls == "cross":
        w = 0.3
        for pts in (
            [(-1, -w), (1, -w), (1, w), (-1, w)],
            [(-w, -1), (w, -1), (w, 1), (-w, 1)],
        ):
            draw.polygon(_polygon(cx, cy, r, angle, pts), fill=colour)
    elif cls == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.42
            a = k * math.pi / 5 - math.pi / 2
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        draw.polygon(_polygon(cx, cy, r, angle, pts), fill=colour)
    else:
        raise ValueError(f"unknown class {cls!r}")


def render(
    rng: np.random.Generator,
    cls: str,
    *,
    background: str | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """One RGB uint8 image of ``cls`` at a random native size (or ``size`` = (w, h))."""
    w, h = size or (int(rng.integers(72, 161)), int(rng.integers(72, 161)))
    kind = background or TRAINING_BACKGROUNDS[int(rng.integers(len(TRAINING_BACKGROUNDS)))]
    bg = background_pixels(rng, kind, w, h)
    bg_mean = bg.reshape(-1, 3).mean(0)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # Clutter: thin lines that are no class.
    for _ in range(int(rng.integers(0, 4))):
        x0, y0, x1, y1 = rng.integers(0, [w, h, w, h])
        draw.line([(x0, y0), (x1, y1)], fill=_colour(rng), width=int(rng.integers(1, 3)))
    r = float(rng.uniform(0.18, 0.42)) * min(w, h)
    cx = float(rng.uniform(r, w - r))
    cy = float(rng.uniform(r, h - r))
    colour = distinct_colour(rng, bg_mean)
    shape_bg = tuple(int(v) for v in bg_mean)
    draw_shape(draw, cls, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), colour, shape_bg)
    out = np.asarray(img, dtype=np.float64)
    out += rng.normal(0, float(rng.uniform(0, 12)), out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def class_counts(n: int, num_classes: int, imbalance: float) -> list[int]:
    """Counts per class with the largest/smallest ratio ``imbalance`` (geometric)."""
    if imbalance < 1:
        raise ValueError("imbalance is largest/smallest count, >= 1")
    weights = np.array([imbalance ** (-i / max(1, num_classes - 1)) for i in range(num_classes)])
    counts = np.floor(weights / weights.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    return [int(c) for c in counts]


def generate(
    n: int,
    *,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    imbalance: float = 1.0,
    background: str | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` images (native sizes) and their labels; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate(
        [np.full(c, i) for i, c in enumerate(class_counts(n, len(classes), imbalance))]
    )
    labels = labels[rng.permutation(len(labels))].astype(np.int64)
    images = [render(rng, classes[int(y)], background=background) for y in labels]
    return images, labels


#: Input corruptions the acceptance benchmarks apply to native images (``corrupt``).
#: Noise sigma is a fraction of the 0-255 range (ImageNet-C convention).
CORRUPTIONS = (
    "brightness+30%",
    "contrast*0.5",
    "noise_sigma0.1",
    "contrast*0.5+noise_sigma0.1",
    "blur",
    "inversion",
    "colour_cast",
)


def corrupt(name: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (uint8 RGB) under one of :data:`CORRUPTIONS`, as uint8."""
    from PIL import ImageFilter

    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {CORRUPTIONS}")
    if name == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(2.5)))
    x = image.astype(np.float64)
    if name == "brightness+30%":
        x = x * 1.3
    if name.startswith("contrast*0.5"):
        x = (x - x.mean()) * 0.5 + x.mean()
    if name.endswith("noise_sigma0.1"):
        x = x + rng.normal(0, 0.1 * 255, x.shape)
    if name == "inversion":
        x = 255 - x
    if name == "colour_cast":
        # A warm white balance: red up, blue down, as a mis-set camera gives.
        x = x * np.array([1.25, 1.0, 0.65]) + np.array([10.0, 0.0, 0.0])
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
