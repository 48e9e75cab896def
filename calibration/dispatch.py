"""``calibrate(config)``: calibrate the ``stable`` version of a model, whatever its task.

The one entry point of a calibration run for the command line, jobs and
benches: it validates the config, finds the stable version and hands it to the
orchestrator of its task (:mod:`calibration.classifier` or
:mod:`calibration.detector`), which import nothing from here.
"""

from __future__ import annotations

from calibration.classifier import calibrate_classifier
from calibration.config import CalibrationConfig
from calibration.detector import calibrate_detector
from calibration.errors import CalibrationError
from calibration.model_io import load_stable_parent
from calibration.result import CalibrationResult


def calibrate(config: CalibrationConfig) -> CalibrationResult:
    """Calibrate the ``stable`` version of ``config.name`` on its captured samples.

    Raises ValueError for options no run can use, NotEnoughSamplesError below
    ``min_samples`` images, and CalibrationError when there is no stable
    version or the task is neither classification nor detection. A rejected
    candidate is not an exception: the result's ``status`` is ``"rejected"``
    with ``reasons``.
    """
    config.validate()
    parent = load_stable_parent(config.model_base, config.name)
    task = parent.card.task
    if task == "classification":
        return calibrate_classifier(config, parent)
    if task == "detection":
        return calibrate_detector(config, parent)
    raise CalibrationError(
        f"calibration supports classifiers and detectors; {config.name} is {task}"
    )
