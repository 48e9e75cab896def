"""Temperature scaling (Guo et al. 2017) and the expected calibration error.

One scalar T divides the logits: ``p = softmax(z / T)``. It is fitted by
minimising the negative log-likelihood of labelled logits; the arg-max, and so
accuracy, is unchanged. With β = 1/T the NLL

    NLL(β) = mean_i [ logsumexp(β z_i) − β z_{i,y_i} ]

is convex in β (a log-sum-exp of linear functions minus a linear term), so a
bounded golden-section search over β finds the global minimum without scipy.

ECE uses M = 15 equal-width confidence bins B_m = ((m−1)/M, m/M]:

    ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)|

with conf the top-class probability and acc the fraction of correct arg-max.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ECE_BINS = 15
#: The fitted temperature is confined to [1/20, 20]: beyond that the data is
#: either separable (NLL keeps falling as T -> 0) or carries no signal.
T_BOUNDS = (0.05, 20.0)
#: A fit this close (relative) to a bound found no minimum inside the bounds.
AT_BOUND = 1e-3


class TemperatureFitError(ValueError):
    """Logits and labels that cannot be used to fit or evaluate a temperature."""


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[1] < 2:
        raise TemperatureFitError(f"logits must be [n, classes >= 2], got shape {z.shape}")
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise TemperatureFitError(f"labels must be [n] with n = {z.shape[0]}, got shape {y.shape}")
    if z.shape[0] == 0:
        raise TemperatureFitError("no labelled logits")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise TemperatureFitError(f"labels must be class indices in [0, {z.shape[1]})")
    if not np.all(np.isfinite(z)):
        raise TemperatureFitError("logits must be finite")
    return z, y.astype(np.int64)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` in float64, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll_beta(z: np.ndarray, y: np.ndarray, beta: float) -> float:
    s = beta * z
    m = s.max(axis=1)
    lse = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
    return float(np.mean(lse - s[np.arange(len(y)), y]))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    z, y = _check(logits, labels)
    return _nll_beta(z, y, 1.0 / float(temperature))


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE with ``bins`` equal-width confidence bins (see the module docstring)."""
    p = np.asarray(probabilities, dtype=np.float64)
    _check(np.log(np.clip(p, 1e-300, None)), labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    # Bin m holds confidences in ((m-1)/M, m/M]; a confidence of exactly 0 cannot occur.
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for m in range(bins):
        sel = idx == m
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    bounds: tuple[float, float] = T_BOUNDS,
    tolerance: float = 1e-6,
) -> float:
    """The T in ``bounds`` that minimises the NLL of ``labels`` under ``softmax(logits / T)``."""
    z, y = _check(logits, labels)
    lo_t, hi_t = bounds
    if not 0 < lo_t < hi_t:
        raise TemperatureFitError(f"bounds must satisfy 0 < low < high, got {bounds}")
    # Golden-section search over beta = 1/T: NLL is convex in beta, so the bracket
    # always keeps the minimiser; ~45 iterations for a 1e-6 relative tolerance.
    a, b = 1.0 / hi_t, 1.0 / lo_t
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _nll_beta(z, y, c), _nll_beta(z, y, d)
    while b - a > tolerance * max(1.0, abs(a) + abs(b)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _nll_beta(z, y, c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _nll_beta(z, y, d)
    beta = (a + b) / 2.0
    return float(1.0 / beta)


def at_bound(temperature: float, bounds: tuple[float, float] = T_BOUNDS) -> bool:
    """Whether a fitted ``temperature`` is a bound of the search, not a minimum inside it.

    NLL is convex in 1/T, so a fit at a bound means the NLL was still falling there.
    At the low bound the labelled logits are nearly separable: sharpening lowers
    the NLL until the few errors stop it, too late to be trusted. At the high bound
    the logits carry (almost) no information about the labels.
    """
    lo, hi = bounds
    return temperature <= lo * (1 + AT_BOUND) or temperature >= hi * (1 - AT_BOUND)


@dataclass(frozen=True)
class CalibrationReport:
    """Accuracy, NLL and ECE of logits at one temperature."""

    temperature: float
    samples: int
    accuracy: float
    nll: float
    ece: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_report(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = ECE_BINS
) -> CalibrationReport:
    """How well ``softmax(logits / T)`` is calibrated on ``labels``."""
    z, y = _check(logits, labels)
    p = softmax(z, temperature)
    return CalibrationReport(
        temperature=float(temperature),
        samples=int(len(y)),
        accuracy=float(np.mean(p.argmax(axis=1) == y)),
        nll=_nll_beta(z, y, 1.0 / float(temperature)),
        ece=expected_calibration_error(p, y, bins),
    )


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature with its quality before (T=1) and after, on evaluation data."""

    temperature: float
    fitted_on: int
    before: CalibrationReport
    after: CalibrationReport
    #: False when the data does not determine T: no fit sample is misclassified, or
    #: the fit stopped at a bound of the search (:func:`at_bound`).
    identified: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "identified": self.identified,
            "fitted_on": self.fitted_on,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }


def fit_and_evaluate(
    fit_logits: np.ndarray,
    fit_labels: np.ndarray,
    eval_logits: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    *,
    bounds: tuple[float, float] = T_BOUNDS,
) -> TemperatureFit:
    """Fit T on one labelled set; report ECE/NLL at T=1 and at T on another (default: the same).

    With every fit sample classified right the NLL falls monotonically as T -> 0
    (every sharpening helps), so the data has no minimum to offer: the search ends
    at the low bound, or wherever the NLL's last digits stop changing, and serving
    that T would give every future error a probability near 1. The fit is then
    marked not ``identified``, as is one at a bound.
    """
    t = fit_temperature(fit_logits, fit_labels, bounds=bounds)
    errors = bool(np.any(np.asarray(fit_logits).argmax(axis=1) != np.asarray(fit_labels)))
    if eval_logits is None or eval_labels is None:
        eval_logits, eval_labels = fit_logits, fit_labels
    return TemperatureFit(
        temperature=t,
        fitted_on=int(len(fit_labels)),
        before=calibration_report(eval_logits, eval_labels, 1.0),
        after=calibration_report(eval_logits, eval_labels, t),
        identified=errors and not at_bound(t, bounds),
    )


def fit_served_temperature(
    fit: tuple[np.ndarray, np.ndarray],
    evaluate: tuple[np.ndarray, np.ndarray],
    parent_logits: np.ndarray,
    parent_temperature: float,
    *,
    in_sample: bool,
) -> tuple[float, dict[str, Any], TemperatureFit | None]:
    """The temperature to export, the card's ``calibration`` entry, and the fit.

    Fits T by NLL on the candidate's ``fit`` logits and reports ECE/NLL on
    ``evaluate`` at T=1 and at T (and the parent's logits at its own temperature).
    When the data does not determine T (no labelled fit sample misclassified, so
    the NLL keeps falling as T -> 0, or a fit at a bound of the search), the fitted
    T would serve every future error at a probability near 1: the parent's
    temperature is kept, and the entry says why (the fit is None).
    """
    t_fit = fit_and_evaluate(*fit, *evaluate)
    calibration: dict[str, Any] = {
        "temperature": t_fit.temperature,
        "method": "temperature_scaling",
        "objective": "nll",
        "fitted_on": t_fit.fitted_on,
        "evaluated_on": int(len(evaluate[1])),
        "evaluation": "in_sample" if in_sample else "held_out",
        "ece_bins": ECE_BINS,
        "before": t_fit.before.to_dict(),
        "after": t_fit.after.to_dict(),
        "parent": calibration_report(parent_logits, evaluate[1], parent_temperature).to_dict(),
    }
    if t_fit.identified:
        return t_fit.temperature, calibration, t_fit
    errors = int(np.sum(fit[0].argmax(-1) != fit[1]))
    calibration.update(
        temperature=parent_temperature,
        method="inherited",
        note=f"the temperature is not identified: the NLL on {t_fit.fitted_on} labelled "
        f"samples ({errors} misclassified) has no minimum inside the search bounds "
        f"(the search ended at T={t_fit.temperature:.3g}); the parent's temperature is kept",
        rejected_fit=t_fit.temperature,
        after=calibration_report(*evaluate, parent_temperature).to_dict(),
    )
    return parent_temperature, calibration, None


def inherited_calibration(temperature: float, note: str) -> dict[str, Any]:
    """The card's ``calibration`` entry of a version that keeps its parent's temperature."""
    return {"temperature": temperature, "method": "inherited", "note": note}
