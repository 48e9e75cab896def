"""Datasets for training: class folders or synthetic, split, fingerprint, weights.

Every image goes through :mod:`contract.preprocessing` (decode -> resize) once
when the set is loaded and is kept as resized uint8; normalisation is applied per
batch by the same module's :func:`normalize`. The tf.data pipeline adds
augmentation for training only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.preprocessing import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    PreprocessSpec,
    decode_image,
    normalize,
    resize,
)
from training import synthetic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class ImageSet:
    """Resized uint8 pixels with labels, class names and stable per-item keys."""

    pixels: np.ndarray  # (N, H, W, 3) uint8, already resized per spec
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    keys: list[str]  # stable identity of each item (relative path, or synthetic index)
    fingerprint: str
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(
            self.pixels[idx],
            self.labels[idx],
            self.class_names,
            [self.keys[i] for i in idx],
            self.fingerprint,
            self.source,
        )

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.class_names)}


def load_directory(
    root: str | Path, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageSet:
    """Read ``root/<class>/<image>`` (Keras ``image_dataset_from_directory`` layout).

    Classes are the sorted sub-folder names. Files that fail to decode are
    skipped and listed in ``skipped`` (the run reports them), never silently
    dropped. The fingerprint hashes every file's relative path and contents.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    class_names = sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if len(class_names) < 2:
        raise ValueError(f"{root} needs at least two class folders, found {class_names}")
    digest = hashlib.sha256()
    pixels, labels, keys, skipped = [], [], [], []
    for label, cls in enumerate(class_names):
        files = sorted(
            p
            for p in (root / cls).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        for path in files:
            rel = path.relative_to(root).as_posix()
            data = path.read_bytes()
            digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            try:
                decoded = decode_image(data, max_pixels=max_pixels, spec=spec)
            except ImageError as exc:
                skipped.append((rel, str(exc)))
                continue
            pixels.append(resize(decoded, spec)[0])
            labels.append(label)
            keys.append(rel)
    if not pixels:
        raise ValueError(f"no decodable images under {root}")
    return ImageSet(
        np.stack(pixels),
        np.asarray(labels, np.int64),
        class_names,
        keys,
        digest.hexdigest(),
        f"directory:{root}",
        skipped,
    )


def synthetic_set(
    spec: PreprocessSpec,
    n: int,
    *,
    seed: int = 0,
    imbalance: float = 1.0,
    background: str | None = None,
    classes: Sequence[str] = synthetic.CLASSES,
) -> ImageSet:
    """The built-in synthetic dataset, resized per ``spec``."""
    images, labels = synthetic.generate(
        n, seed=seed, imbalance=imbalance, background=background, classes=classes
    )
    pixels = np.stack([resize(img, spec)[0] for img in images])
    digest = hashlib.sha256()
    digest.update(f"synthetic:n={n}:seed={seed}:imb={imbalance}:bg={background}:{classes}".encode())
    digest.update(pixels.tobytes())
    digest.update(labels.tobytes())
    keys = [f"synthetic/{seed}/{i}" for i in range(n)]
    return ImageSet(
        pixels,
        labels,
        list(classes),
        keys,
        digest.hexdigest(),
        f"synthetic(n={n}, seed={seed}, imbalance={imbalance})",
    )


def split(data: ImageSet, val_fraction: float, *, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Deterministic split by a hash of each item's key.

    An item's side depends only on its key and the seed, so adding images to a
    folder never moves existing ones between train and validation.
    """
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be in (0, 1)")
    h = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big")
            for k in data.keys
        ]
    )
    is_val = (h % 10_000) < int(val_fraction * 10_000)
    for c in range(len(data.class_names)):
        # Every class present in training must be present in validation too.
        members = np.flatnonzero(data.labels == c)
        if len(members) >= 2 and not is_val[members].any():
            is_val[members[np.argmin(h[members] % 10_000)]] = True
    return data.subset(np.flatnonzero(~is_val)), data.subset(np.flatnonzero(is_val))


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights ``n / (k * n_c)``: every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    if (counts == 0).any():
        missing = [int(i) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"classes {missing} have no training examples")
    return {i: float(len(labels) / (num_classes * c)) for i, c in enumerate(counts)}


def normalized_batches(
    pixels: np.ndarray, spec: PreprocessSpec, batch_size: int
) -> Iterator[np.ndarray]:
    """Model-input batches of resized uint8 pixels, in order."""
    for i in range(0, len(pixels), batch_size):
        yield normalize(pixels[i : i + batch_size], spec)


def make_dataset(
    data: ImageSet,
    spec: PreprocessSpec,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    augment: Sequence | None = None,
):
    """A tf.data pipeline of (model input, label); shuffled and augmented if ``training``.

    Normalisation is :func:`contract.preprocessing.normalize` itself (through
    ``tf.numpy_function``), so training feeds the model exactly what serving does.
    Augmentation layers run after it, inside the training graph only.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((data.pixels, data.labels))
    if training:
        ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=training and len(data) >= batch_size)

    def _normalize(px, y):
        x = tf.numpy_function(lambda a: normalize(a, spec), [px], tf.float32, stateful=False)
        x.set_shape([None, spec.height, spec.width, 3])
        return x, y

    ds = ds.map(_normalize, num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment:

        def _augment(x, y):
            for layer in augment:
                x = layer(x, training=True)
            return x, y

        ds = ds.map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
