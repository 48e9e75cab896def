"""Held-out accuracy of a classifier on photo-sized JPEGs: full decode vs decode_oversample.

    .venv/bin/python bench/decode_accuracy.py [--preset tiny] [--held-out 300] [--side 2016]

Trains the preset on the built-in synthetic data (no export), then writes a held-out
synthetic set (another seed) as photo-sized JPEGs (each image scaled up so its long side
is ``--side`` px, quality 90) and scores the same model on them through the one
preprocessing, once with the full decode and once with ``decode_oversample`` 2.0. A
report, not a gate: the issue's bound is 0.5 points.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.preprocessing import preprocess_bytes  # noqa: E402
from training import synthetic  # noqa: E402
from training.classifier import PRESETS, ClassifierConfig, train_classifier  # noqa: E402


def photo_jpeg(pixels: np.ndarray, side: int) -> bytes:
    """``pixels`` scaled up (bicubic) so the long side is ``side``, as a quality-90 JPEG."""
    h, w = pixels.shape[:2]
    s = side / max(h, w)
    img = Image.fromarray(pixels).resize((round(w * s), round(h * s)), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, write the held-out JPEGs, print and return both accuracies."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--held-out", type=int, default=300)
    ap.add_argument("--side", type=int, default=2016)
    ap.add_argument("--image-size", type=int, help="override the preset's input size")
    ap.add_argument("--images", type=int, help="override the preset's synthetic_images")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    args = ap.parse_args(argv)
    overrides = {
        k: v
        for k, v in (
            ("image_size", args.image_size),
            ("synthetic_images", args.images),
            ("epochs", args.epochs),
        )
        if v is not None
    }
    cfg = ClassifierConfig(**{**PRESETS[args.preset], **overrides}, name="decode_accuracy")
    model = train_classifier(cfg, export=False)["model"]
    images, labels = synthetic.generate(args.held_out, seed=12345)
    jpegs = [photo_jpeg(img, args.side) for img in images]
    result, preds = {}, []
    for name, oversample in (("full decode", None), ("decode_oversample 2", 2.0)):
        spec = dataclasses.replace(cfg.spec, decode_oversample=oversample)
        x = np.stack([preprocess_bytes(j, spec)[0] for j in jpegs])
        pred = model.predict(x, batch_size=64, verbose=0).argmax(axis=-1)
        result[name] = float((pred == labels).mean() * 100)
        preds.append(pred)
        print(f"{name:>20}: held-out accuracy {result[name]:.2f} % ({len(labels)} JPEGs)")
    changed = int((preds[0] != preds[1]).sum())
    print(f"difference: {result['decode_oversample 2'] - result['full decode']:+.2f} points")
    print(f"predictions that changed: {changed} of {len(labels)}")
    return result


if __name__ == "__main__":
    main()
