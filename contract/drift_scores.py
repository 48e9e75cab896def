"""Drift of live inputs against the BatchNorm moving statistics stored in a model.

Every exported signature returns, per image, the spatial mean of x and x² at
each probe BN layer's input (``bn_input_mean``, ``bn_input_sqmean``). Pooled
over a window of n images they give, per channel c,

    m_c = mean_i mean_c(i)            v_c = mean_i sqmean_c(i) - m_c²

(the mean and variance of the layer's input over images and positions), which
are compared with the layer's moving mean μ_c and variance σ²_c (+ ε):

    mean_shift = sqrt( mean_c (m_c - μ_c)² / (σ²_c + ε) )
    sym_kl     = mean_c ½[KL(N(m,v) ‖ N(μ,σ²)) + KL(N(μ,σ²) ‖ N(m,v))]
               = mean_c ¼[(v+ε)/(σ²+ε) + (σ²+ε)/(v+ε) - 2 + (m-μ)²(1/(v+ε) + 1/(σ²+ε))]

A finite window of in-distribution images does not score 0 (sampling noise,
and the inference-mode vs batch-statistics difference), so every export also
stores the distribution of the scores over windows of held-out data (reference
quantiles); the alarm threshold is a high quantile of it. The export also
checks staleness: the training data's own score must be near zero, which
unconverged moving statistics (momentum 0.999 after a short run) fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.model_card import ModelCard, bn_reference_of

SCORES = ("mean_shift", "sym_kl")
#: Default window size in images (the acceptance criteria's "one window").
DEFAULT_WINDOW = 256
#: The quantile of in-distribution window scores used as the alarm threshold...
ALARM_QUANTILE = 0.999
#: ...times this margin: the held-out pool is itself a finite sample, so windows
#: drawn from it vary a little less than windows of fresh traffic do.
ALARM_MARGIN = 1.25


@dataclass(frozen=True)
class ProbeReference:
    """One probe layer's stored statistics and its slice of the probe vector."""

    name: str
    offset: int
    channels: int
    mean: np.ndarray
    variance: np.ndarray
    epsilon: float

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.channels)


def probe_references(card: ModelCard | Mapping[str, Any]) -> list[ProbeReference]:
    """The probes of a model card's ``bn_reference`` (a :class:`ModelCard`, or its JSON
    dict, which may hold just ``{"bn_reference": {"probes": [...]}}``)."""
    return [
        ProbeReference(
            p.name,
            int(p.offset),
            int(p.channels),
            np.asarray(p.moving_mean, np.float64),
            np.asarray(p.moving_variance, np.float64),
            float(p.epsilon),
        )
        for p in bn_reference_of(card).probes
    ]


def layer_scores(
    mean: np.ndarray, sqmean: np.ndarray, probes: list[ProbeReference]
) -> dict[str, dict[str, float]]:
    """Scores per probe layer from pooled window moments (vectors over all probe channels)."""
    mean = np.asarray(mean, np.float64)
    var_all = np.maximum(np.asarray(sqmean, np.float64) - mean**2, 0.0)
    out: dict[str, dict[str, float]] = {}
    for p in probes:
        m, v = mean[p.slice], var_all[p.slice] + p.epsilon
        mu, s2 = p.mean, p.variance + p.epsilon
        d2 = (m - mu) ** 2
        shift = float(np.sqrt(np.mean(d2 / s2)))
        kl = float(np.mean(0.25 * (v / s2 + s2 / v - 2.0 + d2 * (1.0 / v + 1.0 / s2))))
        out[p.name] = {"mean_shift": shift, "sym_kl": kl}
    return out


def pooled_scores(
    per_image_mean: np.ndarray, per_image_sqmean: np.ndarray, probes: list[ProbeReference]
) -> dict[str, dict[str, float]]:
    """Scores of one window given per-image probe outputs ``[n, channels]``."""
    return layer_scores(np.mean(per_image_mean, axis=0), np.mean(per_image_sqmean, axis=0), probes)


def reference_quantiles(
    per_image_mean: np.ndarray,
    per_image_sqmean: np.ndarray,
    probes: list[ProbeReference],
    *,
    window: int = DEFAULT_WINDOW,
    windows: int = 1000,
    seed: int = 0,
    quantiles: Iterable[float] = (0.5, 0.9, 0.99, ALARM_QUANTILE),
) -> dict[str, Any]:
    """Score distribution over ``windows`` random windows of held-out in-distribution images.

    Windows are drawn with replacement (a bootstrap), so a window's sampling
    noise is that of ``window`` independent images even from a small pool.
    Returns, per layer and score, the listed quantiles and the alarm
    ``threshold`` (the ``ALARM_QUANTILE`` quantile times ``ALARM_MARGIN``).
    """
    n = len(per_image_mean)
    if n == 0:
        raise ValueError("no held-out images to calibrate drift scores on")
    rng = np.random.default_rng(seed)
    qs = sorted(set(quantiles) | {ALARM_QUANTILE})
    samples: dict[str, dict[str, list[float]]] = {p.name: {s: [] for s in SCORES} for p in probes}
    for _ in range(windows):
        idx = rng.choice(n, size=window, replace=True)
        scores = pooled_scores(per_image_mean[idx], per_image_sqmean[idx], probes)
        for layer, vals in scores.items():
            for s in SCORES:
                samples[layer][s].append(vals[s])
    layers: dict[str, Any] = {}
    for layer, by_score in samples.items():
        layers[layer] = {}
        for s, vals in by_score.items():
            arr = np.asarray(vals)
            layers[layer][s] = {
                "quantiles": {f"{q:g}": float(np.quantile(arr, q)) for q in qs},
                "threshold": float(np.quantile(arr, ALARM_QUANTILE)) * ALARM_MARGIN,
            }
    return {
        "window": int(window),
        "windows": int(windows),
        "held_out_images": int(n),
        "alarm_quantile": ALARM_QUANTILE,
        "alarm_margin": ALARM_MARGIN,
        "layers": layers,
    }


def thresholds(card: ModelCard | Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Alarm thresholds per layer and score from a model card (a :class:`ModelCard` or
    its JSON dict; empty if absent)."""
    drift = bn_reference_of(card).drift
    if drift is None:
        return {}
    return drift.thresholds()


#: Staleness limits: the training data's own score against the stored statistics.
STALENESS_LIMITS = {"mean_shift": 1.0, "sym_kl": 1.0}


def staleness(
    per_image_mean: np.ndarray,
    per_image_sqmean: np.ndarray,
    probes: list[ProbeReference],
    limits: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The training data's own drift score against the stored statistics.

    The statistics were estimated on this very data, so its score must be near
    small in absolute terms (``STALENESS_LIMITS``: channel means within one
    standard deviation RMS, variances within a factor of about four; what is
    left after precise BN is the inference-mode vs batch-statistics difference,
    largest at late layers with little spatial extent). The bar is
    absolute rather than the reference quantiles because those are computed
    against the same statistics and would be inflated by the same staleness.
    Moving statistics that never converged (momentum 0.999 after a short run)
    fail here.
    """
    limits = limits or STALENESS_LIMITS
    scores = pooled_scores(per_image_mean, per_image_sqmean, probes)
    failures = [
        f"{layer}.{s}={scores[layer][s]:.4g} > {limits[s]}"
        for layer in scores
        for s in SCORES
        if scores[layer][s] > limits[s]
    ]
    return {
        "images": int(len(per_image_mean)),
        "scores": scores,
        "limits": dict(limits),
        "passed": not failures,
        "failures": failures,
    }
