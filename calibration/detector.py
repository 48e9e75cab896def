"""Calibration of a detector: AdaBN on captured traffic, box feedback, gated on mAP and parity.

:func:`calibrate_detector` follows the classifier's path (same sample split,
precise-BN re-estimation, prior, drift and staleness checks, private export,
publish or reject, label moves), with what differs for boxes:

- no temperature is fitted (the parent's is kept; a detector's scores are
  per-class sigmoids the exported graph does not rescale);
- ``prior_strength="auto"`` tries the source weights of
  :data:`calibration.reestimate.AUTO_SOURCE_WEIGHTS` and keeps the most adapted
  one within the mAP tolerance that leaves the held-out traffic below the
  drift alarm (with box feedback: the one with the best reference-set mAP,
  :func:`choose_prior`);
- with at least ``min_fine_tune_labels`` box-labelled samples (box feedback,
  :func:`calibration.feedback.record_box_feedback`) the weights are fine-tuned
  on the box-labelled fit samples plus the reference set
  (:mod:`calibration.detector_fine_tune`). The order is AdaBN, prior, then
  fine-tuning with BN frozen in inference mode and the statistics collected
  again after every epoch: the weights learn under the normalisation the
  exported graph applies, and the last statistics describe the final weights,
  which keep ``fine_tune_weight_mix`` of their fine-tuned change (WiSE-FT).
  The box-labelled held-out samples, seen by neither the statistics nor the
  weights, judge parent and candidate;
- the gate judges mAP on the shipped reference set
  (:mod:`training.detection.reference`), agreement between inference and
  training mode, and whether the candidate still detects objects; with box
  feedback also mAP on the held-out box-labelled traffic, whether the parent
  finds the feedback's boxes at all, and the balance of their classes
  (:mod:`calibration.detector_gate`). Without enough box feedback the path and
  its checks are those of AdaBN alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from calibration import detector_gate
from calibration.config import CalibrationConfig
from calibration.detector_fine_tune import (
    BoxFeedback,
    collect_box_feedback,
    fine_tune_on_boxes,
    score_boxes,
    why_not_fine_tuned,
)
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
    data = load_enough_samples(
        config.samples_dir, config.name, spec, config.max_samples, config.min_samples
    )
    x, split = data.inputs, split_samples(data, config.holdout_fraction)
    boxes = collect_box_feedback(
        data.objects or [None] * len(data), labels, (spec.height, spec.width), split
    )
    why_not = why_not_fine_tuned(config, boxes)
    model = load_keras_model(parent.dir)
    bs = config.batch_size
    before = measure_parent(model, postprocess, parent, ref, x, split, bs)
    judged = None if why_not else BoxesJudged.of_parent(model, postprocess, x, boxes, bs)
    rng = np.random.default_rng(config.seed)
    stats = reestimate_statistics(model, x[split.fit], rng, bs)
    agreement = mode_agreement_on_traffic(model, postprocess, stats, x[split.held], labels, rng, bs)
    prior = choose_prior(
        model,
        postprocess,
        stats,
        parent,
        ref,
        x[split.held],
        before,
        config,
        box_feedback=judged is not None,
    )
    stats.assign(prior[0])
    if judged is None:
        fine_tune = {"ran": False, "why_not": why_not or ""}
    else:
        fine_tune = fine_tune_on_boxes(model, stats, prior[0], x, boxes, ref, parent.card, config)
        # The weights changed: parity is judged on them, under the traffic's own statistics.
        agreement = mode_agreement_on_traffic(
            model, postprocess, stats, x[split.held], labels, rng, bs, recollect=True
        )
        stats.collect_again(prior[0])
        judged = judged.with_candidate(model, postprocess, x, boxes, bs)
        fine_tune.update(judged.lineage())
    cand_ref = evaluate_reference(model, postprocess, ref, batch_size=bs)
    drift = (before.drift, stats.source_weight(prior[0]))
    checks, parity = gate(
        model,
        postprocess,
        parent,
        ref,
        x,
        split,
        before,
        cand_ref,
        agreement,
        drift,
        config,
        box_feedback=judged is not None,
    )
    if judged is not None:
        checks = [drift_after_fine_tuning(c) for c in checks]
        checks[1:1] = box_checks(judged, boxes, before, labels, config)
    samples = samples_summary(config.samples_dir, data, split, int(data.labelled.sum()), 0)
    samples["box_labelled"] = len(boxes)
    drifted, temperature = before.drift.drifted, parent.temperature
    method = "adabn-precise-bn" + ("+box-feedback-fine-tune" if judged is not None else "")
    lineage = lineage_entry(
        parent, method, stats, fine_tune, prior, samples, temperature, drifted, checks
    )
    note = "detectors: no temperature is fitted (the parent's is kept)"
    metrics = card_metrics(before.reference, cand_ref, parity)
    if judged is not None:
        metrics["box_feedback_held_out"] = judged.traffic_dict()
    candidate = CandidateExport(
        model=model,
        task="detection",
        spec=spec,
        labels=labels,
        postprocess=postprocess,
        card_fields=candidate_card_fields(
            parent.card,
            metrics=metrics,
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
    if judged is not None:
        accuracy["traffic"] = judged.traffic_dict()
    return published.result(checks, temperature, None, accuracy, samples, prior)


@dataclass(frozen=True)
class BoxesJudged:
    """Parent (and candidate) against the box feedback: what the box checks judge."""

    parent_all: DetectionMetrics  # every box-labelled sample (none was trained on yet)
    parent_held: DetectionMetrics  # the held-out box-labelled samples
    candidate_held: DetectionMetrics | None = None

    @classmethod
    def of_parent(
        cls,
        model: keras.Model,
        postprocess: Callable,
        x: np.ndarray,
        boxes: BoxFeedback,
        batch_size: int,
    ) -> BoxesJudged:
        """The parent's mAP against the feedback, on all of it and on its held-out part.

        One prediction over every box-labelled image; the held-out part is scored
        on its rows of it.
        """
        out = predict(model, postprocess, x[boxes.index], batch_size=batch_size)
        _, held_set = boxes.part(boxes.held)
        held_out = {k: v[boxes.held] for k, v in out.items()}
        return cls(score_outputs(out, boxes.dataset), score_outputs(held_out, held_set))

    def with_candidate(
        self,
        model: keras.Model,
        postprocess: Callable,
        x: np.ndarray,
        boxes: BoxFeedback,
        batch_size: int,
    ) -> BoxesJudged:
        """The same, with the candidate's mAP on the held-out part."""
        held = score_boxes(model, postprocess, x, boxes, boxes.held, batch_size)
        return dataclasses.replace(self, candidate_held=held)

    def traffic_dict(self) -> dict[str, Any]:
        """The result's and the card's held-out traffic mAP, parent and candidate."""
        cand = self.candidate_held
        return {
            "parent": self.parent_held.to_dict(),
            "candidate": cand.to_dict() if cand is not None else None,
            "evaluated_on": "box-labelled held-out samples (model-input pixels)",
        }

    def lineage(self) -> dict[str, Any]:
        """What the lineage's ``fine_tune`` entry adds: the held-out mAP, parent vs candidate."""
        cand = self.candidate_held
        return {
            "held_out_images": self.parent_held.images,
            "held_out_map_50_95": {
                "parent": self.parent_held.map_50_95,
                "candidate": cand.map_50_95 if cand is not None else None,
            },
        }


def drift_after_fine_tuning(check: GateCheck) -> GateCheck:
    """The ``drift`` check of a fine-tuned candidate: reported, not gating.

    The alarm thresholds are the parent's: the spread of the parent's features
    around its statistics on its own domain. Fine-tuned weights make other
    features with another spread, so those limits no longer say whether the
    statistics describe the traffic; ``statistics_converged`` judges that on the
    candidate itself, the held-out box mAP whether it serves the traffic, and
    the published version's own thresholds are computed on its own features.
    """
    if check.name != "drift" or not check.gating:
        return check
    note = "; informational: the thresholds are the parent's, the weights were fine-tuned"
    return dataclasses.replace(check, gating=False, reason=check.reason + note)


def box_checks(
    judged: BoxesJudged,
    boxes: BoxFeedback,
    before: DetectorParent,
    labels: list[str],
    config: CalibrationConfig,
) -> list[GateCheck]:
    """The checks box feedback adds (:mod:`calibration.detector_gate`)."""
    classes = np.concatenate([s.classes for s in boxes.dataset.samples] or [np.zeros(0, int)])
    _, held_set = boxes.part(boxes.held)
    return [
        detector_gate.feedback_class_balance_check(classes, labels, config.max_class_share),
        detector_gate.feedback_agreement_check(
            judged.parent_all, before.reference, boxes.dataset.num_boxes()
        ),
        detector_gate.map_traffic_check(
            judged.parent_held, judged.candidate_held, held_set.num_boxes()
        ),
    ]


def mode_agreement_on_traffic(
    model: keras.Model,
    postprocess: Callable,
    stats: Reestimation,
    x_held: np.ndarray,
    labels: list[str],
    rng: np.random.Generator,
    batch_size: int,
    *,
    recollect: bool = False,
) -> dict[str, Any]:
    """Inference vs training mode on held-out traffic under the traffic's own statistics.

    Measured before any mixing with the source: a mix differs from batch
    statistics by design. Leaves those statistics assigned. ``recollect``
    collects them again first (the weights changed since the first collection).
    """
    if recollect:
        stats.collect_again(0.0)
    else:
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
    *,
    box_feedback: bool = False,
) -> tuple[float, list[dict[str, Any]]]:
    """The prior strength asked for, or for ``"auto"`` the most adapted weight that passes.

    Among the weights within the mAP tolerance that clear the drift alarm the
    least source wins; when every weight loses mAP, the least loss (rejected
    by the gate). With ``box_feedback`` (the weights are fine-tuned on the
    traffic's boxes next) the weight with the best reference-set mAP wins: the
    fine-tuned weights learn to read the traffic, and statistics that serve the
    source keep the source domain served (statistics fitted to the traffic cost
    the clean domain 3.5-4 more mAP points at the same recovery,
    docs/calibration.md). The drift alarm does not bound that choice: it is not
    gating after fine-tuning (:func:`drift_after_fine_tuning`).
    """
    if config.prior_strength != "auto":
        return float(config.prior_strength), []
    bs = config.batch_size

    def measure(w: float) -> dict[str, Any]:
        ref_map = evaluate_reference(model, postprocess, ref, batch_size=bs).map_50_95
        return {"reference_map_50_95": ref_map}

    def by_adaptation(t: dict[str, Any]) -> float:
        return -t["source_weight"]

    def by_reference(t: dict[str, Any]) -> tuple[float, float]:
        return t["reference_map_50_95"], -t["source_weight"]

    if box_feedback:
        return search_prior(
            stats,
            measure,
            None,
            reference_key="reference_map_50_95",
            floor=-np.inf,
            rank=by_reference,
            fallback_rank=by_reference,
        )
    return search_prior(
        stats,
        measure,
        traffic_drifts(model, parent.probe_names, x_held, before.drift, bs),
        reference_key="reference_map_50_95",
        floor=before.reference.map_50_95 - config.accuracy_tolerance,
        rank=by_adaptation,
        fallback_rank=by_reference,
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
    *,
    box_feedback: bool = False,
) -> tuple[list[GateCheck], dict[str, Any]]:
    """Every check but the export's and box feedback's, and the card's parity entry.

    ``drift`` is the parent's drift alarm and the candidate's source weight;
    ``box_feedback``: the candidate was fine-tuned on box feedback.
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
            box_feedback=box_feedback,
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
