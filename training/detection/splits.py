"""The detector's three splits: train (fit), validation (early stopping), test (the card).

As the classifier's (:func:`training.data.three_way_split`): each image's side is
fixed by a hash of its file name and the seed, so adding images never moves the
existing ones, and stratified, here by each image's most frequent class, so no class
is left out of a held-out figure by chance.

- ``--data synthetic``: three sets drawn from separate seed streams;
- one COCO file: split three ways by ``val_fraction`` and ``test_fraction``;
- with ``--val-data``: the training file is all training; the held-out file is split
  in two, stratified, into validation and test (``test_fraction`` decides the test
  share of the held-out images, relative to ``val_fraction``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from training.data import key_fractions, split_sides
from training.detection.config import DetectorTrainConfig
from training.detection.data import (
    DatasetError,
    DetectionDataset,
    SyntheticConfig,
    load_coco,
    write_synthetic_coco,
)

#: Seed offsets of the synthetic validation and test sets: new draws, never copies.
VALIDATION_SEED, TEST_SEED = 1_000_003, 2_000_003
#: Which figure of the card comes from which split.
SPLIT_OF = {
    "map_50_95": "test",
    "map_50": "test",
    "map_75": "test",
    "per_class_ap": "test",
    "parity": "test",
    "best_validation_map_50": "validation (early stopping: a selected figure)",
}


class DetectionSplits(NamedTuple):
    """Train (fit), validation (early stopping) and test (held-out figures, parity)."""

    train: DetectionDataset
    validation: DetectionDataset
    test: DetectionDataset


def image_strata(dataset: DetectionDataset) -> np.ndarray:
    """Each image's most frequent (non-crowd) class; -1 for an image without boxes."""
    out = np.full(len(dataset), -1, np.int64)
    for i, s in enumerate(dataset.samples):
        classes = s.classes[~s.crowd]
        if len(classes):
            out[i] = int(np.bincount(classes).argmax())
    return out


def _keys(dataset: DetectionDataset) -> list[str]:
    return [s.path.name for s in dataset.samples]


def three_way(
    dataset: DetectionDataset, val_fraction: float, test_fraction: float, *, seed: int = 0
) -> DetectionSplits:
    """Train / validation / test of one dataset (deterministic, stratified)."""
    if len(dataset) < 3:
        raise DatasetError("need at least three images for train, validation and test")
    side = split_sides(
        _keys(dataset), image_strata(dataset), val_fraction, test_fraction, seed=seed
    )
    if not all((side == k).any() for k in (0, 1, 2)):
        # Too few images for the fractions to reach every side: the lowest hashes go.
        u = key_fractions(_keys(dataset), seed)
        order = np.argsort(u)
        side[:] = 0
        side[order[0]], side[order[1]] = 2, 1
    return DetectionSplits(*(dataset.subset(np.flatnonzero(side == k)) for k in (0, 1, 2)))


def halve(
    held_out: DetectionDataset, test_share: float, *, seed: int = 0
) -> tuple[DetectionDataset, DetectionDataset]:
    """(validation, test) of a held-out dataset: ``test_share`` of it to test, per stratum."""
    if len(held_out) < 2:
        raise DatasetError("the held-out file needs at least two images (validation and test)")
    u = key_fractions(_keys(held_out), seed)
    is_test = u < test_share
    strata = image_strata(held_out)
    for c in np.unique(strata):
        members = np.flatnonzero(strata == c)
        if len(members) >= 2 and len(set(is_test[members].tolist())) == 1:
            # Both sides see the stratum: its image of lowest hash changes side.
            flip = members[np.argmin(u[members])]
            is_test[flip] = not is_test[flip]
    if is_test.all() or not is_test.any():
        is_test[np.argmin(u)] = not is_test[np.argmin(u)]
    return held_out.subset(np.flatnonzero(~is_test)), held_out.subset(np.flatnonzero(is_test))


def load_datasets(cfg: DetectorTrainConfig, work_dir: Path) -> DetectionSplits:
    """The run's three splits; the synthetic sets are written under ``work_dir``."""
    if cfg.data == "synthetic":
        root = Path(cfg.synthetic_dir) if cfg.synthetic_dir else work_dir
        synth = SyntheticConfig()
        sets = [
            ("train", cfg.synthetic_images, cfg.seed),
            ("val", cfg.synthetic_val_images, cfg.seed + VALIDATION_SEED),
            ("test", cfg.synthetic_test_images, cfg.seed + TEST_SEED),
        ]
        return DetectionSplits(
            *(
                load_coco(write_synthetic_coco(root / d, n, seed=s, config=synth))
                for d, n, s in sets
            )
        )
    train = load_coco(cfg.data, cfg.images)
    if not cfg.val_data:
        return three_way(train, cfg.val_fraction, cfg.test_fraction, seed=cfg.seed)
    held_out = load_coco(cfg.val_data, cfg.val_images)
    if held_out.labels != train.labels or held_out.category_ids != train.category_ids:
        raise DatasetError(
            f"held-out categories {list(zip(held_out.category_ids, held_out.labels, strict=True))} "
            f"differ from training categories "
            f"{list(zip(train.category_ids, train.labels, strict=True))}"
        )
    share = cfg.test_fraction / (cfg.val_fraction + cfg.test_fraction)
    return DetectionSplits(train, *halve(held_out, share, seed=cfg.seed))
