"""What a calibration run is asked to do: one frozen :class:`CalibrationConfig`.

The command line parses into it (:mod:`calibration.cli`), and a calibration job
records it as JSON in its job file and rebuilds it in the child process
(:mod:`calibration.jobs`), so both run exactly the same request. Its defaults
are the command line's.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

from calibration.errors import InvalidOptionError

#: Version labels a published candidate may be pointed at.
PROMOTE_LABELS = ("canary", "stable")

#: Fine-tuning epochs and Adam learning rate where the options leave them unset, by
#: task. Measured: `bench/calibration_acceptance.py` (classifier) and
#: `bench/detector_calibration.py` (detector; a cosine-decayed 2e-3 over 10 epochs
#: recovers more of the shift than 3e-4 over 4, docs/calibration.md).
FINE_TUNE_DEFAULTS = {"classification": (4, 3e-4), "detection": (10, 2e-3)}


@dataclass(frozen=True)
class CalibrationConfig:
    """Every option of a calibration run (flags of ``python -m training calibrate`` and more).

    ``model_base`` is the model repository, ``samples_dir`` the capture store
    root (samples of ``name`` are in ``<samples_dir>/<name>``). Paths are kept
    as strings so that :meth:`to_dict` is JSON as it is. Options after
    ``seed`` have no command-line flag. Classifier-only options (labels,
    fine-tuning, temperature) do not apply to detectors.
    """

    name: str
    samples_dir: str
    model_base: str = "models"
    #: Source statistics as N pseudo-images (0: the samples alone); "auto" searches.
    prior_strength: float | Literal["auto"] = "auto"
    min_samples: int = 64
    min_labelled: int = 32
    max_samples: int = 2048
    accuracy_tolerance: float = 0.02
    max_class_share: float = 0.75
    promote: str = "canary"
    #: None: the task's default (:data:`FINE_TUNE_DEFAULTS`); 0 turns fine-tuning off.
    fine_tune_epochs: int | None = None
    fine_tune_learning_rate: float | None = None
    #: Detectors: the candidate's weights are parent + mix x (fine-tuned - parent).
    fine_tune_weight_mix: float = 0.5
    min_fine_tune_labels: int = 96
    seed: int = 0
    holdout_fraction: float = 0.25
    min_accuracy_lift: float = 0.1
    parity_threshold: float | None = None
    batch_size: int = 64
    fine_tune_fraction: float = 1.0

    def __post_init__(self) -> None:
        # Paths arrive as Path objects from Python callers; JSON needs strings.
        object.__setattr__(self, "model_base", os.fspath(self.model_base))
        object.__setattr__(self, "samples_dir", os.fspath(self.samples_dir))

    def validate(self) -> None:
        """Raise :class:`InvalidOptionError` (a ValueError) for options no calibration can run with.

        Not done at construction: a job records whatever it was asked, and the
        run itself fails on a bad option (the job's outcome says so).
        """
        if self.promote not in PROMOTE_LABELS:
            raise InvalidOptionError(
                f"promote must be one of {PROMOTE_LABELS}, got {self.promote!r}"
            )
        strength = self.prior_strength
        if strength != "auto" and (
            isinstance(strength, str) or not math.isfinite(strength) or strength < 0
        ):
            raise InvalidOptionError(f"prior_strength must be >= 0 or 'auto', got {strength!r}")
        if self.min_samples < 1 or self.min_labelled < 1 or not 0 <= self.holdout_fraction < 1:
            raise InvalidOptionError("min_samples >= 1, min_labelled >= 1, 0 <= holdout < 1")
        epochs, rate = self.fine_tune_epochs, self.fine_tune_learning_rate
        if (
            (epochs is not None and epochs < 0)
            or (rate is not None and rate <= 0)
            or not 0 < self.fine_tune_fraction <= 1
            or not 0 < self.fine_tune_weight_mix <= 1
        ):
            raise InvalidOptionError(
                "fine_tune_epochs >= 0, fine_tune_learning_rate > 0, 0 < fraction <= 1, "
                "0 < weight mix <= 1"
            )

    def fine_tune(self, task: str) -> tuple[int, float]:
        """Epochs and learning rate of fine-tuning a ``task`` model (unset: the task's default)."""
        epochs, rate = FINE_TUNE_DEFAULTS[task]
        if self.fine_tune_epochs is not None:
            epochs = self.fine_tune_epochs
        if self.fine_tune_learning_rate is not None:
            rate = self.fine_tune_learning_rate
        return epochs, rate

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (:meth:`from_dict` rebuilds the config)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CalibrationConfig:
        """The config :meth:`to_dict` wrote; unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown calibration options {unknown}")
        return cls(**values)
