"""Domain errors of a calibration run.

They say what went wrong, not how to answer it: callers map them (the command
line to exit codes, :mod:`calibration.jobs` to job outcomes, the gateway to
HTTP statuses) by class or by the stable ``code`` string.
"""

from __future__ import annotations

from contract.errors import DomainError


class CalibrationError(DomainError, RuntimeError):
    """Calibration cannot run as asked (no stable version, unsupported model, bad input)."""

    code = "calibration_error"


class InvalidOptionError(CalibrationError, ValueError):
    """An option no calibration can run with (a negative prior, no samples asked...)."""

    code = "invalid_option"


class NotEnoughSamplesError(CalibrationError):
    """Too few captured samples to re-estimate statistics from."""

    code = "not_enough_samples"


class LabelError(CalibrationError):
    """A promotion or rollback that cannot be done."""

    code = "label_error"
