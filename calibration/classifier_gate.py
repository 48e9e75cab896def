"""The gate checks of a classifier candidate (the shared ones are in :mod:`calibration.gate`).

- ``class_balance``: no class dominates the samples (labels, else the parent's
  predictions): statistics of one class are not a domain;
- ``accuracy_traffic``: on the labelled samples not fine-tuned on, the
  candidate is not worse than the parent by more than ``accuracy_tolerance``,
  and ``above_chance``: it beats the majority-class rate by ``min_accuracy_lift``;
- ``accuracy_reference``: on the version's shipped reference set, the candidate
  is not worse than the parent by more than ``accuracy_tolerance``. It gates
  unless the traffic has drifted from the parent's domain *and* there is
  labelled traffic to judge on: statistics adapted to a shifted domain are, by
  design, worse on the source domain, and the labelled traffic is then the
  evidence about the domain being served;
- ``parity``: inference mode vs training mode (batch statistics) on the
  labelled samples (else on the reference set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from calibration.config import CalibrationConfig
from calibration.gate import GateCheck, largest_share, says
from contract import bn
from contract.model_card import ModelCard

#: The parity threshold when neither the config nor the parent's card gives one.
DEFAULT_PARITY_THRESHOLD = 0.02


@dataclass(frozen=True)
class Judged:
    """The labelled traffic the gate judges on and the accuracies it compares."""

    y: np.ndarray
    labelled: np.ndarray
    unseen: np.ndarray  # labelled samples the candidate's weights never learned from
    tuned: np.ndarray  # labelled samples fine-tuned on
    enough_labels: bool
    parent_logits: np.ndarray
    candidate_logits: np.ndarray
    parent_reference: float
    candidate_reference: float
    reference_images: int
    domain_shift: bool
    fine_tuned: bool


def class_balance_check(
    judged: Judged, class_names: list[str], config: CalibrationConfig
) -> GateCheck:
    """``class_balance``: the largest class share of the labels (else the parent's predictions)."""
    limit = config.max_class_share
    # Without labels the parent's predictions say what the traffic holds: the candidate's
    # cannot, since statistics fitted to one class wash that class's signal out.
    source = "labels" if judged.enough_labels else "parent_predictions"
    values = judged.y[judged.labelled] if judged.enough_labels else judged.parent_logits.argmax(-1)
    share, top = largest_share(values)
    cand_share, cand_top = largest_share(judged.candidate_logits.argmax(-1))
    return GateCheck(
        "class_balance",
        share <= limit,
        True,
        says(
            share <= limit,
            "one class dominates the samples (statistics of one class are not a domain)",
            f"{share:.0%} of the samples' {source.replace('_', ' ')} are class "
            f"{class_names[top] if top is not None else '?'} (limit {limit:.0%})",
        ),
        {
            "largest_share": share,
            "class": top,
            "source": source,
            "limit": limit,
            "candidate_prediction_share": cand_share,
            "candidate_prediction_class": cand_top,
        },
    )


def traffic_accuracy_checks(
    judged: Judged, n_labelled: int, config: CalibrationConfig
) -> tuple[list[GateCheck], dict[str, Any]]:
    """``accuracy_traffic`` and ``above_chance``, and the accuracies measured on the traffic."""
    if not judged.enough_labels:
        return [
            GateCheck(
                "accuracy_traffic",
                True,
                False,
                f"not checked: {n_labelled} labelled samples (< {config.min_labelled})",
                {"images": n_labelled},
            )
        ], {}
    unseen, y, tuned = judged.unseen, judged.y, judged.tuned
    p_acc = float(np.mean(judged.parent_logits[unseen].argmax(-1) == y[unseen]))
    c_acc = float(np.mean(judged.candidate_logits[unseen].argmax(-1) == y[unseen]))
    base_rate, _ = largest_share(y[unseen])
    measured = {
        "parent": p_acc,
        "candidate": c_acc,
        "images": int(unseen.sum()),
        "fine_tuned_on": int(tuned.sum()),
        "majority_rate": base_rate,
    }
    return [
        _accuracy_traffic_check(measured, bool(tuned.any()), config.accuracy_tolerance),
        _above_chance_check(c_acc, base_rate, config.min_accuracy_lift),
    ], measured


def _accuracy_traffic_check(
    measured: dict[str, Any], fine_tuned: bool, tolerance: float
) -> GateCheck:
    c_acc, p_acc = measured["candidate"], measured["parent"]
    return GateCheck(
        "accuracy_traffic",
        c_acc >= p_acc - tolerance,
        True,
        says(
            c_acc >= p_acc - tolerance,
            "worse than the parent on labelled traffic",
            f"accuracy on {measured['images']} labelled traffic images {c_acc:.3f} vs parent "
            f"{p_acc:.3f} (tolerance {tolerance})"
            + (f"; {measured['fine_tuned_on']} more were fine-tuned on" if fine_tuned else ""),
        ),
        {**measured, "tolerance": tolerance},
    )


def _above_chance_check(c_acc: float, base_rate: float, min_lift: float) -> GateCheck:
    return GateCheck(
        "above_chance",
        c_acc - base_rate >= min_lift,
        True,
        says(
            c_acc - base_rate >= min_lift,
            "no better than guessing the majority class",
            f"accuracy on labelled traffic {c_acc:.3f} vs majority-class rate {base_rate:.3f} "
            f"(lift needed {min_lift})",
        ),
        {"candidate": c_acc, "majority_rate": base_rate, "min_lift": min_lift},
    )


def reference_accuracy_check(judged: Judged, tolerance: float) -> GateCheck:
    """``accuracy_reference``: gating unless drifted traffic with labels decides instead."""
    gates = not (judged.domain_shift and judged.enough_labels)
    cand, parent = judged.candidate_reference, judged.parent_reference
    notes = (
        (
            ""
            if gates
            else "; informational: the traffic has drifted from the reference "
            "domain and labelled traffic decides"
        )
        + ("; in-sample: the reference set was fine-tuned on" if judged.fine_tuned else "")
        + (
            "; labelled feedback on the traffic would let the gate judge the traffic's domain"
            if judged.domain_shift and not judged.enough_labels
            else ""
        )
    )
    return GateCheck(
        "accuracy_reference",
        cand >= parent - tolerance,
        gates,
        says(
            cand >= parent - tolerance,
            "worse than the parent on the version's reference set",
            f"accuracy on the reference set {cand:.3f} vs parent {parent:.3f} "
            f"(tolerance {tolerance})",
        )
        + notes,
        {
            "parent": parent,
            "candidate": cand,
            "images": judged.reference_images,
            "tolerance": tolerance,
            "traffic_drifted": judged.domain_shift,
            "fine_tuned_on": judged.fine_tuned,
        },
    )


def parity_threshold(card: ModelCard, config: CalibrationConfig) -> float:
    """The largest inference/training-mode gap: the config's, else the parent card's."""
    if config.parity_threshold is not None:
        return config.parity_threshold
    parity = card.metrics.parity
    if parity is None or parity.threshold is None:
        return DEFAULT_PARITY_THRESHOLD
    return float(parity.threshold)


def parity_check(
    candidate: keras.Model,
    evaluated: tuple[np.ndarray, np.ndarray, str],
    threshold: float,
    rng: np.random.Generator,
    batch_size: int,
) -> tuple[GateCheck, dict[str, Any]]:
    """``parity`` on ``evaluated = (x, y, where)``; also the card's ``metrics.parity``."""
    px, py, where = evaluated
    # Training mode normalises by batch statistics: batches must be mixed, not in capture order.
    mix = rng.permutation(len(py))
    parity = bn.classification_parity(
        candidate, px[mix], py[mix], threshold=threshold, batch_size=batch_size
    )
    check = GateCheck(
        "parity",
        parity.passed,
        True,
        says(
            parity.passed,
            parity.failure,
            f"inference-mode accuracy {parity.inference_metric:.3f} vs training-mode "
            f"{parity.training_metric:.3f} on the {where.replace('_', ' ')} "
            f"(gap {parity.gap:.3f}, limit {threshold})",
        ),
        {**parity.to_dict(), "evaluated_on": where},
    )
    return check, {**parity.to_dict(), "evaluated_on": where}
