"""Captured traffic as calibration uses it: enough samples, labels, a split by request."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import NotEnoughSamplesError
from calibration.samples import SampleSet, load_samples
from contract.preprocessing import PreprocessSpec

#: Fewest images on either side of a split; below it everything fits and the
#: held-out checks run in-sample.
MIN_SPLIT_SIDE = 8


@dataclass(frozen=True)
class TrafficSplit:
    """Boolean masks over the samples; a request's images stay on one side.

    ``unit`` is each sample's uniform number in [0, 1) from its request id,
    ``holdout`` the held-out part, ``fit`` the rest, and ``held`` what the
    held-out checks run on: the held-out part, or every sample (in-sample)
    when there are too few to split.
    """

    unit: np.ndarray
    holdout: np.ndarray
    fit: np.ndarray
    held: np.ndarray


def request_unit(request_ids: list[str]) -> np.ndarray:
    """A uniform number in [0, 1) per request id: splits keep one request's images together."""
    return np.array(
        [int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) / 2**32 for r in request_ids]
    )


def label_indices(labels: list[Any], class_names: list[str]) -> tuple[np.ndarray, int]:
    """Feedback labels as class indices (-1: none); also how many were not valid classes."""
    out = np.full(len(labels), -1, dtype=np.int64)
    invalid = 0
    for i, lab in enumerate(labels):
        if lab is None:
            continue
        if isinstance(lab, str) and lab in class_names:
            out[i] = class_names.index(lab)
        elif isinstance(lab, int | np.integer) and 0 <= int(lab) < len(class_names):
            out[i] = int(lab)
        else:
            invalid += 1
    return out, invalid


def load_enough_samples(
    samples_dir: str | os.PathLike[str],
    name: str,
    spec: PreprocessSpec,
    max_samples: int,
    min_samples: int,
) -> SampleSet:
    """The newest captured samples of ``name``; :class:`NotEnoughSamplesError` below the minimum."""
    shape = (spec.height, spec.width, spec.channels)
    data = load_samples(samples_dir, name, max_samples=max_samples, input_shape=shape)
    if len(data) < min_samples:
        raise NotEnoughSamplesError(
            f"{len(data)} usable samples of {name} in {samples_dir} (need {min_samples})"
            + (f"; skipped {data.skipped}" if data.skipped else "")
        )
    return data


def split_samples(data: SampleSet, holdout_fraction: float) -> TrafficSplit:
    """Split the samples by request id into a fit part and a held-out part."""
    unit = request_unit(data.request_ids)
    holdout = unit < holdout_fraction
    if holdout.sum() < MIN_SPLIT_SIDE or (~holdout).sum() < MIN_SPLIT_SIDE:
        holdout[:] = False  # too few to split: everything fits, the held-out checks run in-sample
    fit = ~holdout
    held = holdout if holdout.any() else fit
    return TrafficSplit(unit, holdout, fit, held)


def samples_summary(
    samples_dir: str | os.PathLike[str],
    data: SampleSet,
    split: TrafficSplit,
    labelled: int,
    invalid_labels: int,
) -> dict[str, Any]:
    """The lineage's ``samples`` entry: what was used, from when, and a fingerprint."""
    return {
        "store": str(Path(samples_dir).resolve()),
        "used": int(len(data)),
        "fit": int(split.fit.sum()),
        "held_out": int(split.holdout.sum()),
        "labelled": labelled,
        "invalid_labels": invalid_labels,
        "skipped": data.skipped,
        "versions": {str(k): int(v) for k, v in Counter(data.versions.tolist()).items()},
        "captured_from": float(data.captured_at.min()),
        "captured_to": float(data.captured_at.max()),
        "fingerprint": hashlib.sha256("\n".join(sorted(data.request_ids)).encode()).hexdigest()[
            :16
        ],
    }
