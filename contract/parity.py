"""The parity gate: is inference mode (moving statistics) worse than training mode
(batch statistics) on the same held-out images, by more than a tolerance?

Both modes judge the same images, so the comparison is paired: only the images on
which the modes disagree (discordant pairs) carry information about the gap. Let
``b`` be the images only training mode gets right, ``c`` those only inference mode
gets right, ``N`` all images; the gap is ``(b - c) / N``.

- Decision: an exact conditional test on the discordant pairs (McNemar's exact
  test, shifted to the tolerance). Given ``n = b + c`` discordant images, ``b`` is
  binomial with ``pi = p_b / (p_b + p_c)``; a gap of ``tol`` means
  ``pi = 1/2 + tol * N / (2 n)`` (the discordant rate estimated by ``n / N``). The
  gate refuses when ``b`` is significantly larger than that (one-sided, at
  ``1 - confidence``). With ``tol = 0`` it is exactly McNemar's exact test.
  A gap above the tolerance that the images cannot tell from noise passes; a
  small gap on many images can fail.
- Interval: Newcombe's hybrid score interval for a difference of paired
  proportions (Newcombe 1998, method 10: Wilson intervals of each mode's
  accuracy, combined with the correlation of the pairs), two-sided at
  ``confidence``. It is reported; the test decides.
- Collapse: inference mode predicting one class for (nearly) every image of a
  held-out set with several classes, while training mode does not, is refused
  whatever the test says (the classic bug's signature, visible on any size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

#: Two-sided confidence of the interval; the test is one-sided at 1 - CONFIDENCE.
CONFIDENCE = 0.95
#: "Nearly every image": the share of one predicted class that counts as a collapse.
COLLAPSE_SHARE = 0.95
TEST = "McNemar exact, one-sided, shifted to the tolerance (binomial on discordant pairs)"
INTERVAL_METHOD = "Newcombe hybrid score (method 10) for paired proportions"


@dataclass
class ParityReport:
    """Inference-mode vs training-mode quality on the same held-out images."""

    inference_metric: float
    training_metric: float
    # training - inference, in the metric's units (accuracy: 0..1). One-sided: the
    # failure to catch is inference mode doing worse; better is sampling noise.
    gap: float
    distinct_predictions: int  # classes predicted in inference mode (1 = collapse)
    passed: bool
    threshold: float  # the tolerance the gap is tested against
    images: int = 0
    #: Images only training mode got right / only inference mode got right.
    training_only: int = 0
    inference_only: int = 0
    p_value: float = float("nan")  # of H0 "gap <= threshold"
    interval: tuple[float, float] = (float("nan"), float("nan"))
    confidence: float = CONFIDENCE
    collapsed: bool = False
    #: The share of the held-out images given inference mode's most-predicted class.
    dominant_share: float = float("nan")
    test: str = TEST
    interval_method: str = INTERVAL_METHOD

    @property
    def failure(self) -> str:
        """Why it failed ('' when it passed): a significant gap, or a collapse."""
        if self.passed:
            return ""
        if self.collapsed:
            return (
                f"inference mode predicts one class for {self.dominant_share:.0%} of the "
                "held-out images"
            )
        lo, hi = self.interval
        return (
            f"inference mode is significantly worse than training mode: gap {self.gap:.3f} "
            f"({self.confidence:.0%} interval {lo:.3f}..{hi:.3f}) exceeds the tolerance "
            f"{self.threshold} (p = {self.p_value:.2g}, {self.images} images)"
        )

    @property
    def decision(self) -> str:
        """``pass``, ``refused: gap`` or ``refused: collapse``."""
        if self.passed:
            return "pass"
        return "refused: collapse" if self.collapsed else "refused: gap"

    def to_dict(self) -> dict:
        """The card's ``metrics.parity`` (JSON: an undefined figure is null)."""
        return {k: _json_number(v) for k, v in self._fields().items()}

    def _fields(self) -> dict:
        return {
            "inference_mode": self.inference_metric,
            "training_mode": self.training_metric,
            "gap": self.gap,
            "distinct_predictions": self.distinct_predictions,
            "passed": self.passed,
            "threshold": self.threshold,
            "images": self.images,
            "discordant": {
                "training_only": self.training_only,
                "inference_only": self.inference_only,
            },
            "test": self.test,
            "p_value": self.p_value,
            "alpha": round(1 - self.confidence, 10),
            "interval": list(self.interval),
            "interval_method": self.interval_method,
            "confidence": self.confidence,
            "collapsed": self.collapsed,
            "dominant_share": self.dominant_share,
            "decision": self.decision,
        }


def _json_number(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value


def gap_p_value(training_only: int, inference_only: int, images: int, tolerance: float) -> float:
    """One-sided p-value of H0 "gap <= tolerance" from the discordant pairs (see module)."""
    n = training_only + inference_only
    if n == 0:
        return 1.0
    pi0 = 0.5 + tolerance * images / (2 * n)
    if pi0 >= 1.0:  # fewer discordant images than the tolerance: the gap cannot exceed it
        return 1.0
    return float(binomtest(training_only, n, max(pi0, 0.0), alternative="greater").pvalue)


def paired_interval(
    both: int, training_only: int, inference_only: int, neither: int, confidence: float
) -> tuple[float, float]:
    """Newcombe's method-10 interval for training accuracy - inference accuracy."""
    n = both + training_only + inference_only + neither
    if n == 0:
        return (float("nan"), float("nan"))
    right_trn, right_inf = both + training_only, both + inference_only
    p1, p2 = right_trn / n, right_inf / n
    l1, u1 = binomtest(right_trn, n).proportion_ci(confidence, "wilson")
    l2, u2 = binomtest(right_inf, n).proportion_ci(confidence, "wilson")
    margins = right_trn * (n - right_trn) * right_inf * (n - right_inf)
    phi = (both * neither - training_only * inference_only) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    lower = d - math.sqrt(
        max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    )
    upper = d + math.sqrt(
        max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    )
    return (max(-1.0, lower), min(1.0, upper))


def one_class_share(predictions: np.ndarray) -> float:
    """The share of ``predictions`` given their most common value (nan when empty)."""
    if len(predictions) == 0:
        return float("nan")
    return float(np.unique(predictions, return_counts=True)[1].max() / len(predictions))


def paired_parity(
    inference_right: np.ndarray,
    training_right: np.ndarray,
    *,
    tolerance: float,
    confidence: float = CONFIDENCE,
    inference_predictions: np.ndarray | None = None,
    training_predictions: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> ParityReport:
    """The gate's decision from per-image correctness in both modes (same images, same order).

    With predictions and labels (classification), a collapse is also checked: inference
    mode gives one class to at least :data:`COLLAPSE_SHARE` of the images while neither
    the labels nor training mode's predictions are that uniform.
    """
    inf = np.asarray(inference_right, bool)
    trn = np.asarray(training_right, bool)
    if inf.shape != trn.shape:
        raise ValueError(f"{inf.shape} inference results for {trn.shape} training-mode ones")
    n = len(inf)
    both, neither = int(np.sum(inf & trn)), int(np.sum(~inf & ~trn))
    b, c = int(np.sum(trn & ~inf)), int(np.sum(inf & ~trn))
    acc_inf = float(inf.mean()) if n else float("nan")
    acc_trn = float(trn.mean()) if n else float("nan")
    p = gap_p_value(b, c, n, tolerance)
    distinct, share, collapsed = -1, float("nan"), False
    if inference_predictions is not None and labels is not None:
        distinct = int(len(np.unique(inference_predictions)))
        share = one_class_share(np.asarray(inference_predictions))
        uniform_elsewhere = one_class_share(np.asarray(labels)) >= COLLAPSE_SHARE or (
            training_predictions is not None
            and one_class_share(np.asarray(training_predictions)) >= COLLAPSE_SHARE
        )
        collapsed = share >= COLLAPSE_SHARE and not uniform_elsewhere
    passed = n > 0 and p >= 1 - confidence and not collapsed
    return ParityReport(
        inference_metric=acc_inf,
        training_metric=acc_trn,
        gap=acc_trn - acc_inf,
        distinct_predictions=distinct,
        passed=bool(passed),
        threshold=tolerance,
        images=n,
        training_only=b,
        inference_only=c,
        p_value=p,
        interval=paired_interval(both, b, c, neither, confidence),
        confidence=confidence,
        collapsed=collapsed,
        dominant_share=share,
    )
