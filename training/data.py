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
from typing import NamedTuple

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


class Splits(NamedTuple):
    """Train (fit), validation (early stopping, LR schedule) and test (held-out figures)."""

    train: ImageSet
    validation: ImageSet
    test: ImageSet


def key_fractions(keys: Sequence[str], seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per key, fixed by the key and the seed alone."""
    h = [int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") for k in keys]
    return (np.array(h, dtype=np.uint64) % 10_000).astype(np.float64) / 10_000


def _stratify(side: np.ndarray, u: np.ndarray, members: np.ndarray, fractions: dict) -> None:
    """Top up one class's held-out sides (1, 2) to ``round(fraction * n)`` each, from its
    training images of lowest hash, then from the other held-out side's surplus; keep
    at least one image to train on."""
    want = {
        s: max(1, round(f * len(members))) if len(members) >= 3 else 0 for s, f in fractions.items()
    }

    def surplus(which: int) -> np.ndarray:
        on = members[side[members] == which]
        return on[np.argsort(-u[on])][: max(0, len(on) - want[which])]

    for which in (2, 1):
        short = want[which] - int((side[members] == which).sum())
        if short > 0:
            spare = members[side[members] == 0]
            donors = np.concatenate([spare[np.argsort(u[spare])], surplus(3 - which)])
            side[donors[:short]] = which
    if len(members) and not (side[members] == 0).any():
        # A class the model never sees cannot be learned: keep one to train on.
        donors = np.concatenate([surplus(2), surplus(1), members[np.argsort(-u[members])]])
        side[donors[0]] = 0


def split_sides(
    keys: Sequence[str],
    strata: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Each item's side, 0 train / 1 validation / 2 test, by a hash of its key and the
    seed, stratified by ``strata`` (an integer per item: its class): see
    :func:`three_way_split`."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) with a sum below 1")
    u = key_fractions(keys, seed)
    side = np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))
    strata = np.asarray(strata)
    for c in np.unique(strata):
        _stratify(side, u, np.flatnonzero(strata == c), {2: test_fraction, 1: val_fraction})
    return side


def three_way_split(
    data: ImageSet, val_fraction: float, test_fraction: float, *, seed: int = 0
) -> Splits:
    """Train / validation / test, deterministic by a hash of each item's key, per class.

    An item's side depends on its key and the seed (test below ``test_fraction``,
    validation in the next ``val_fraction``), so adding images never moves the
    existing ones. Stratified: each class then gets at least ``round(fraction *
    n_class)`` validation and test images (at least one of each when it has 3+),
    topped up from its training images of lowest hash, so a rare class is never
    left out of a held-out figure by chance.
    """
    side = split_sides(data.keys, data.labels, val_fraction, test_fraction, seed=seed)
    return Splits(
        data.subset(np.flatnonzero(side == 0)),
        data.subset(np.flatnonzero(side == 1)),
        data.subset(np.flatnonzero(side == 2)),
    )


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights ``n / (k * n_c)``: every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    if (counts == 0).any():
        missing = [int(i) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"classes {missing} have no training examples")
    return {i: float(len(labels) / (num_classes * c)) for i, c in enumerate(counts)}


def normalized_batches(
    pixels: np.ndarray, spec: PreprocessSpec, batch_size: int, *, shuffle_seed: int | None = None
) -> Iterator[np.ndarray]:
    """Model-input batches of resized uint8 pixels, in order, or with ``shuffle_seed``
    in a seeded random order: i.i.d. batches, which any pass that runs BN on batch
    statistics (precise BN) needs, since class folders load sorted by class."""
    order = (
        np.random.default_rng(shuffle_seed).permutation(len(pixels))
        if shuffle_seed is not None
        else np.arange(len(pixels))
    )
    for i in range(0, len(pixels), batch_size):
        yield normalize(pixels[np.sort(order[i : i + batch_size])], spec)


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
