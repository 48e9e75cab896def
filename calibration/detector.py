"""Calibration of a detector: AdaBN on captured traffic, gated on mAP and parity.

:func:`calibrate_detector` follows the classifier's path (same sample split,
precise-BN re-estimation, prior, drift and staleness checks, private export,
publish or reject, label moves), with what differs for boxes:

- feedback is image labels, not boxes, so nothing is fine-tuned and no
  temperature is fitted (the parent's is kept; a detector's scores are
  per-class sigmoids the exported graph does not rescale);
- ``prior_strength="auto"`` tries the source weights of
  :data:`calibration.reestimate.AUTO_SOURCE_WEIGHTS` and keeps the most adapted
  one within the mAP tolerance that leaves the held-out traffic below the
  drift alarm;
- the gate judges mAP on the shipped reference set
  (:mod:`training.detection.reference`), agreement between inference and
  training mode, and whether the candidate still detects objects
  (:mod:`calibration.detector_gate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from calibration import detector_gate
from calibration.config import CalibrationConfig
from calibration.detector_gate import (
    CONFIDENT_SCORE,
    confident_classes,
    confident_score,
    mode_agreement,
)
from calibration.errors import CalibrationError
from calibration.gate import GateCheck, ParentDrift, drift_check, parent_drift, traffic_drifts
from calibration.model_io import StableParent, load_keras_model
from calibration.publish import (
    CandidateExport,
    candidate_card_fields,
    export_and_publish,
    lineage_entry,
)
from calibration.reestimate import Reestimation, reestimate_statistics, search_prior
from calibration.result import CalibrationResult
from calibration.temperature import inherited_calibration
from calibration.traffic import TrafficSplit, load_enough_samples, samples_summary, split_samples
from contract.json_sections import thaw
from contract.model_card import ModelCard
from training.detection.anchors import AnchorConfig, generate_anchors
from training.detection.evaluate import DetectionMetrics, predict
from training.detection.postprocess import NmsConfig, make_postprocess
from training.detection.reference import (
    REFERENCE_SET,
    ReferenceSet,
    evaluate_reference,
    load_reference_set,
    score_outputs,
)


@dataclass(frozen=True)
class DetectorParent:
    """The parent detector on its reference set and the traffic, before anything changes."""

    reference: DetectionMetrics
    confident: float  # the score that makes a detection confident (detector_gate)
    reference_rate: float  # confident detections per reference image
    traffic_classes: np.ndarray  # classes of its confident detections on the traffic
    drift: ParentDrift


def postprocess_from_card(card: ModelCard) -> Callable:
    """The exported graph's decode + NMS, rebuilt from the card's ``detection`` section."""
    det = card.detection
    if det is None:
        raise CalibrationError(f"the card of {card.name} version {card.version} has no detection")
    spec = card.preprocess_spec
    anchors = generate_anchors(AnchorConfig.from_dict(thaw(det.anchors)), spec.height, spec.width)
    nms = thaw(det.nms)
    nms_fields = {k: nms[k] for k in NmsConfig.__dataclass_fields__ if k in nms}
    return make_postprocess(anchors, NmsConfig(**nms_fields), thaw(det.box_variances))


def calibrate_detector(config: CalibrationConfig, parent: StableParent) -> CalibrationResult:
    """Calibrate the ``stable`` detector ``parent`` on captured samples (module docstring)."""
    spec = parent.card.preprocess_spec
    labels = list(parent.card.labels)
    hint = "; export it again with this release to calibrate it"
    ref_path, ref_bytes = parent.reference_set(REFERENCE_SET, hint)
    ref = load_reference_set(ref_path, spec, labels)
    postprocess = postprocess_from_card(parent.card)
    # Feedback labels are image labels: not used for boxes.
    data = load_enough_samples(
        config.samples_dir, config.name, spec, config.max_samples, config.min_samples
    )
    x, split = data.inputs, split_samples(data, config.holdout_fraction)
    model = load_keras_model(parent.dir)
    bs = config.batch_size
    before = measure_parent(model, postprocess, parent, ref, x, split, bs)
    rng = np.random.default_rng(config.seed)
    stats = reestimate_statistics(model, x[split.fit], rng, bs)
    agreement = mode_agreement_on_traffic(model, postprocess, stats, x[split.held], labels, rng, bs)
    prior = choose_prior(model, postprocess, stats, parent, ref, x[split.held], before, config)
    stats.assign(prior[0])
    cand_ref = evaluate_reference(model, postprocess, ref, batch_size=bs)
    drift = (before.drift, stats.source_weight(prior[0]))
    checks, parity = gate(
        model, postprocess, parent, ref, x, split, before, cand_ref, agreement, drift, config
    )
    samples = samples_summary(config.samples_dir, data, split, int(data.labelled.sum()), 0)
    fine_tune = {"ran": False, "why_not": "detector feedback has no boxes"}
    drifted, temperature = before.drift.drifted, parent.temperature
    lineage = lineage_entry(
        parent, "adabn-precise-bn", stats, fine_tune, prior, samples, temperature, drifted, checks
    )
    note = "detectors: no temperature is fitted (feedback carries no boxes)"
    candidate = CandidateExport(
        model=model,
        task="detection",
        spec=spec,
        labels=labels,
        postprocess=postprocess,
        card_fields=candidate_card_fields(
            parent.card,
            metrics=card_metrics(before.reference, cand_ref, parity),
            x_fit=x[split.fit],
            calibration=inherited_calibration(temperature, note),
            lineage=lineage,
        ),
        extra_files={REFERENCE_SET: ref_bytes},
    )
    published = export_and_publish(parent, candidate, x, split, checks, promote=config.promote)
    accuracy = {
        "reference_set": {"parent": before.reference.to_dict(), "candidate": cand_ref.to_dict()},
        "metric": "map_50_95",
    }
    return published.result(checks, temperature, None, accuracy, samples, prior)


def mode_agreement_on_traffic(
    model: keras.Model,
    postprocess: Callable,
    stats: Reestimation,
    x_held: np.ndarray,
    labels: list[str],
    rng: np.random.Generator,
    batch_size: int,
) -> dict[str, Any]:
    """Inference vs training mode on held-out traffic under the traffic's own statistics.

    Measured before any mixing with the source: a mix differs from batch
    statistics by design. Leaves those statistics assigned.
    """
    stats.assign(0.0)
    mix = rng.permutation(len(x_held))  # batch statistics need mixed batches
    return mode_agreement(
        model, postprocess, x_held[mix], labels, CONFIDENT_SCORE, batch_size=batch_size
    )


def measure_parent(
    model: keras.Model,
    postprocess: Callable,
    parent: StableParent,
    ref: ReferenceSet,
    x: np.ndarray,
    split: TrafficSplit,
    batch_size: int,
) -> DetectorParent:
    """The parent's reference-set mAP, confident score and rate, traffic classes and drift."""
    ref_out = predict(model, postprocess, ref.x, batch_size=batch_size)
    confident = confident_score(ref_out)
    traffic_out = predict(model, postprocess, x, batch_size=batch_size)
    return DetectorParent(
        reference=score_outputs(ref_out, ref.dataset),
        confident=confident,
        reference_rate=len(confident_classes(ref_out, confident)) / len(ref),
        traffic_classes=confident_classes(traffic_out, confident),
        drift=parent_drift(model, parent.card, parent.probe_names, x[split.held], batch_size),
    )


def choose_prior(
    model: keras.Model,
    postprocess: Callable,
    stats: Reestimation,
    parent: StableParent,
    ref: ReferenceSet,
    x_held: np.ndarray,
    before: DetectorParent,
    config: CalibrationConfig,
) -> tuple[float, list[dict[str, Any]]]:
    """The prior strength asked for, or for ``"auto"`` the most adapted weight that passes.

    Among the weights within the mAP tolerance that clear the drift alarm the
    least source wins; when every weight loses mAP, the least loss (rejected
    by the gate).
    """
    if config.prior_strength != "auto":
        return float(config.prior_strength), []
    bs = config.batch_size
    return search_prior(
        stats,
        lambda w: {
            "reference_map_50_95": evaluate_reference(
                model, postprocess, ref, batch_size=bs
            ).map_50_95
        },
        traffic_drifts(model, parent.probe_names, x_held, before.drift, bs),
        reference_key="reference_map_50_95",
        floor=before.reference.map_50_95 - config.accuracy_tolerance,
        rank=lambda t: -t["source_weight"],
        fallback_rank=lambda t: (t["reference_map_50_95"], -t["source_weight"]),
    )


def gate(
    model: keras.Model,
    postprocess: Callable,
    parent: StableParent,
    ref: ReferenceSet,
    x: np.ndarray,
    split: TrafficSplit,
    before: DetectorParent,
    cand_ref: DetectionMetrics,
    agreement: dict[str, Any],
    drift: tuple[ParentDrift, float],
    config: CalibrationConfig,
) -> tuple[list[GateCheck], dict[str, Any]]:
    """Every check but the export's, and the card's parity entry.

    ``drift`` is the parent's drift alarm and the candidate's source weight.
    """
    held = int(split.held.sum())
    held_out = predict(model, postprocess, x[split.held], batch_size=config.batch_size)
    cand_rate = len(confident_classes(held_out, before.confident)) / held
    parity, parity_metrics = detector_gate.parity_check(agreement, config.parity_threshold)
    checks = [
        detector_gate.class_balance_check(
            before.traffic_classes,
            list(parent.card.labels),
            before.confident,
            config.max_class_share,
        ),
        detector_gate.map_reference_check(
            before.reference,
            cand_ref,
            (len(ref), ref.dataset.num_boxes()),
            config.accuracy_tolerance,
            before.drift.drifted,
        ),
        detector_gate.detects_objects_check(
            cand_rate, before.reference_rate, before.confident, held
        ),
        parity,
        drift_check(
            model,
            parent.probe_names,
            x[split.held],
            drift[0],
            source_weight=drift[1],
            held_out=bool(split.holdout.any()),
            batch_size=config.batch_size,
        ),
    ]
    return checks, parity_metrics


def card_metrics(
    parent_ref: DetectionMetrics, cand_ref: DetectionMetrics, parity: dict[str, Any]
) -> dict[str, Any]:
    """The candidate card's ``metrics``: mAP on the reference set, parity of the modes."""
    return {
        **cand_ref.to_dict(),
        "evaluated_on": "reference_set",
        "evaluator": "pycocotools COCOeval bbox, model-input pixels",
        "parent_reference_set": parent_ref.to_dict(),
        "parity": parity,
        "parity_metric": "agreement of inference with training mode, mAP@.5",
        "evaluated_in": "inference_mode",
    }
