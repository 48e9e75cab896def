"""The gate's shared checks: drift under the candidate's statistics, staleness, messages.

Every check is a :class:`GateCheck`; ``gating`` checks decide whether a
candidate is published, the others are reported only. The checks of one task
are in :mod:`calibration.classifier_gate` and :mod:`calibration.detector_gate`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from calibration.model_io import probe_moments
from contract import bn, drift_scores
from contract.model_card import ModelCard

#: Parent accuracy on labelled traffic this far below its reference-set accuracy
#: counts as a domain shift (as drift above the alarm threshold does).
LABELLED_SHIFT_MARGIN = 0.1

Thresholds = dict[str, dict[str, float]]


@dataclass
class GateCheck:
    """One gate check: ``gating`` checks decide, the others are reported only."""

    name: str
    passed: bool
    gating: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The check as the card's lineage and ``rejection.json`` record it."""
        return dataclasses.asdict(self)


def says(passed: bool, failure: str, facts: str) -> str:
    """A check's reason: the facts, led by what is wrong when it failed."""
    return facts if passed else f"{failure}: {facts}"


def gate_passed(checks: list[GateCheck]) -> bool:
    """Whether every gating check passed."""
    return all(c.passed for c in checks if c.gating)


def largest_share(values: np.ndarray) -> tuple[float, int | None]:
    """The share of the most common value and that value (None when there are none)."""
    if len(values) == 0:
        return 0.0, None
    cls, count = Counter(values.tolist()).most_common(1)[0]
    return count / len(values), int(cls)


@dataclass(frozen=True)
class ParentDrift:
    """The parent's drift on the held-out traffic: the alarm, its scores, what exceeds it."""

    thresholds: Thresholds
    scores: Thresholds
    exceedances: list[str]

    @property
    def drifted(self) -> bool:
        """Whether the traffic raises the parent's drift alarm."""
        return bool(self.exceedances)


def drift_exceedances(
    model: keras.Model,
    probe_names: list[str],
    x: np.ndarray,
    thresholds: Thresholds,
    *,
    batch_size: int = 64,
) -> tuple[Thresholds, list[str]]:
    """Drift scores of ``x`` pooled as one window under ``model``'s statistics.

    Returns the scores per layer and the ``layer.score=value > threshold``
    failures against ``thresholds`` (the alarm thresholds of a model card).
    """
    m, s = probe_moments(model, probe_names, x, batch_size)
    refs = drift_scores.probe_references(
        {"bn_reference": {"probes": bn.probe_reference(model, probe_names)}}
    )
    scores = drift_scores.pooled_scores(m, s, refs)
    failures = [
        f"{layer}.{name}={scores[layer][name]:.4g} > {limit:.4g}"
        for layer, by_score in thresholds.items()
        if layer in scores
        for name, limit in by_score.items()
        if scores[layer][name] > limit
    ]
    return scores, failures


def parent_drift(
    model: keras.Model,
    card: dict[str, Any],
    probe_names: list[str],
    x_held: np.ndarray,
    batch_size: int,
) -> ParentDrift:
    """The parent's drift alarm on the held-out traffic (nothing when its card has none)."""
    thresholds = drift_scores.thresholds(card)
    if not thresholds:
        return ParentDrift({}, {}, [])
    scores, exceed = drift_exceedances(
        model, probe_names, x_held, thresholds, batch_size=batch_size
    )
    return ParentDrift(thresholds, scores, exceed)


def residual_limits(
    thresholds: Thresholds, parent_scores: Thresholds, source_weight: float
) -> Thresholds:
    """Drift limits for a candidate that mixes the source statistics in with weight w.

    Mixed statistics sit a share w of the way back towards the source, so the
    traffic keeps that share of its mean shift (w x the parent's score) and, the
    KL being quadratic in the shift, w² of its KL. The candidate passes when what
    is left beyond that is within the alarm threshold; w = 0 gives the plain
    thresholds. The version published gets alarm thresholds computed on this
    traffic under its own statistics, so it does not alarm on it afterwards.
    """
    power = {"mean_shift": 1, "sym_kl": 2}
    return {
        layer: {
            name: limit
            + source_weight ** power.get(name, 1) * parent_scores.get(layer, {}).get(name, 0.0)
            for name, limit in by_score.items()
        }
        for layer, by_score in thresholds.items()
    }


def traffic_drifts(
    model: keras.Model,
    probe_names: list[str],
    x_held: np.ndarray,
    parent: ParentDrift,
    batch_size: int,
) -> Callable[[float], bool] | None:
    """``drifts(w)``: does the held-out traffic exceed the residual limits for weight w now?

    None when the parent's card has no drift alarm (nothing to exceed).
    """
    if not parent.thresholds:
        return None

    def drifts(source_weight: float) -> bool:
        limits = residual_limits(parent.thresholds, parent.scores, source_weight)
        return bool(drift_exceedances(model, probe_names, x_held, limits, batch_size=batch_size)[1])

    return drifts


def drift_check(
    candidate: keras.Model,
    probe_names: list[str],
    x_held: np.ndarray,
    parent: ParentDrift,
    *,
    source_weight: float,
    held_out: bool,
    batch_size: int = 64,
) -> GateCheck:
    """The ``drift`` check: held-out traffic under the candidate's statistics vs the alarm."""
    if not parent.thresholds:
        return GateCheck(
            "drift", True, False, "not checked: the parent's card has no bn_reference.drift", {}
        )
    limits = residual_limits(parent.thresholds, parent.scores, source_weight)
    cand_scores, exceed = drift_exceedances(
        candidate, probe_names, x_held, limits, batch_size=batch_size
    )
    residual = f" (plus the residual of source weight {source_weight:.3g})" if source_weight else ""
    return GateCheck(
        "drift",
        not exceed,
        True,
        says(
            not exceed,
            "held-out traffic still drifts under the candidate's statistics",
            "; ".join(exceed)
            or f"below the alarm thresholds on {len(x_held)} held-out images" + residual,
        ),
        {
            "candidate_scores": cand_scores,
            "limits": limits,
            "source_weight": source_weight,
            "parent_scores": parent.scores,
            "parent_exceedances": parent.exceedances,
            "images": len(x_held),
            "held_out": held_out,
        },
    )


def staleness_check(card: ModelCard) -> GateCheck | None:
    """``statistics_converged`` from the exported card's staleness metric (None: not measured)."""
    stale = card.metrics.staleness
    if stale is None:
        return None
    return GateCheck(
        "statistics_converged",
        bool(stale.passed),
        True,
        says(
            bool(stale.passed),
            "the statistics do not describe the samples they were estimated on",
            "; ".join(stale.failures)
            or "the fit samples score below the candidate's alarm thresholds",
        ),
        {"failures": list(stale.failures), "images": stale.images},
    )
