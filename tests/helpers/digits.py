"""Real data as a user's arrives: scikit-learn's bundled handwritten digits written out
as class folders of PNG files (``DIR/<digit>/<n>.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, *, per_class: int | None = None, size: int = 32) -> Path:
    """Write ``load_digits`` (1,797 8x8 greyscale images, 0..16) under ``root`` as
    ``<digit>/<n>.png``, upscaled to ``size`` pixels, in the dataset's order within
    each class; ``per_class`` keeps the first so many of each digit. Returns ``root``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        images = digits.images[digits.target == digit][:per_class]
        for n, image in enumerate(images):
            pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
            # Bilinear: an 8x8 digit enlarged with nearest neighbours is blocks, not strokes.
            big = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BILINEAR)
            big.save(folder / f"{n:04d}.png")
    return root
