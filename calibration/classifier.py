"""Calibration of a classifier: captured traffic -> re-estimated BN statistics -> gated new version.

:func:`calibrate_classifier` takes the version labelled ``stable`` and:

1. loads its Keras model (``assets.extra/model.keras``), model card and shipped
   reference set, and the newest captured samples of the model
   (:mod:`calibration.capture_store`) with their feedback labels;
2. splits the samples by request id into a fit part and a held-out part, and
   re-estimates the statistics of *every* BN layer on the fit part
   (:mod:`calibration.reestimate`: AdaBN; optionally mixed with the source
   statistics by ``prior_strength``; ``"auto"`` chooses it, see below). Layers
   frozen at training time are unfrozen for the pass, so each layer sees its
   input normalised by the new statistics upstream, and re-frozen before saving;
3. when the traffic has drifted (below) and at least ``min_fine_tune_labels``
   labelled fit samples fall in the fine-tuning share (``fine_tune_fraction``
   of them by request id, all by default), fine-tunes the weights on them plus
   the reference set for ``fine_tune_epochs`` (:mod:`calibration.fine_tune`:
   BN frozen in inference mode under the new statistics, collected again after
   every epoch). Every later check on labelled traffic is judged on labelled
   samples the fine-tuning did not see;
4. fits a temperature (:mod:`calibration.temperature`) on the labelled fit samples
   not fine-tuned on (after fine-tuning on all of them: on the labelled
   held-out ones, and the report says ``in_sample``) when there are at least
   ``min_labelled`` labelled ones, reports NLL/ECE at T=1 and at T on the
   labelled held-out samples, and exports the temperature in the graph
   (``classifier_postprocess(T)``). A temperature the feedback does not
   determine (no labelled fit sample misclassified, or a fit at a search bound)
   is not served: the parent's is kept;
5. gates the candidate (every check is computed and reported):
   :mod:`calibration.classifier_gate` (``class_balance``, ``accuracy_traffic``,
   ``above_chance``, ``accuracy_reference``, ``parity``) and
   :mod:`calibration.gate` (``drift``: the held-out traffic's drift score under
   the candidate's statistics is below the parent's alarm threshold at every
   probe layer, plus the residual a prior leaves by design;
   ``statistics_converged``: the export's staleness check on the fit samples).
   The traffic counts as drifted from the parent's domain when it raises the
   parent's drift alarm, or when the parent's accuracy on the labelled traffic
   is ``LABELLED_SHIFT_MARGIN`` below its reference-set accuracy;
6. publishes a passing candidate (:mod:`calibration.publish`) as version N+1
   with ``lineage`` (parent, samples, prior, temperature, gate) and points
   ``canary`` (or ``stable``) at it; a failing one goes to
   ``<name>/rejected/<N+1>`` with the reasons, and ``models.config`` is not touched.

``prior_strength="auto"`` (the default) tries the source weights N/(N+n) of
:data:`calibration.reestimate.AUTO_SOURCE_WEIGHTS` on the one collected set of
statistics and keeps the one with the best accuracy on the labelled *fit*
samples among those within ``accuracy_tolerance`` of the parent on the
reference set and that leave the held-out traffic below the drift alarm (the
most adapted one on ties): full adaptation when the source domain does not
suffer, a mix when it would. Without enough labels it is 0. Every weight
tried is recorded in the lineage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from calibration.classifier_gate import (
    Judged,
    class_balance_check,
    parity_check,
    parity_threshold,
    reference_accuracy_check,
    traffic_accuracy_checks,
)
from calibration.config import CalibrationConfig
from calibration.fine_tune import fine_tune_candidate, fine_tune_share, why_not_fine_tuned
from calibration.gate import (
    LABELLED_SHIFT_MARGIN,
    GateCheck,
    ParentDrift,
    drift_check,
    parent_drift,
    traffic_drifts,
)
from calibration.model_io import StableParent, accuracy, load_keras_model, logits
from calibration.publish import (
    CandidateExport,
    candidate_card_fields,
    export_and_publish,
    lineage_entry,
)
from calibration.reestimate import Reestimation, reestimate_statistics, search_prior
from calibration.result import CalibrationResult
from calibration.samples import SampleSet
from calibration.temperature import TemperatureFit, fit_served_temperature, inherited_calibration
from calibration.traffic import (
    TrafficSplit,
    label_indices,
    load_enough_samples,
    samples_summary,
    split_samples,
)
from contract.preprocessing import PreprocessSpec, normalize
from training.classifier import REFERENCE_SET, classifier_postprocess

#: Fewest labelled held-out samples to evaluate a temperature on; else in-sample.
MIN_TEMPERATURE_EVALUATION = 10

XY = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Traffic:
    """The captured samples as arrays, their labels (-1: none) and the split."""

    data: SampleSet
    x: np.ndarray
    y: np.ndarray
    labelled: np.ndarray
    split: TrafficSplit
    invalid_labels: int
    enough_labels: bool

    @property
    def n_labelled(self) -> int:
        """How many samples have a valid feedback label."""
        return int(self.labelled.sum())


@dataclass(frozen=True)
class ParentMeasures:
    """The parent on the traffic and the reference set, before anything changes."""

    logits: np.ndarray
    reference_accuracy: float
    drift: ParentDrift
    domain_shift: bool


@dataclass(frozen=True)
class CandidateMeasures:
    """The candidate after re-estimation and fine-tuning."""

    logits: np.ndarray
    reference_accuracy: float
    fine_tune: dict[str, Any]
    tuned: np.ndarray
    unseen: np.ndarray


def calibrate_classifier(config: CalibrationConfig, parent: StableParent) -> CalibrationResult:
    """Calibrate the ``stable`` classifier ``parent`` on captured samples (module docstring).

    Raises NotEnoughSamplesError below ``min_samples`` images and
    CalibrationError when the version ships no reference set; a rejected
    candidate is not an exception (the result's status says so).
    """
    spec = parent.card.preprocess_spec
    ref_path, ref_bytes = parent.reference_set(REFERENCE_SET)
    reference = load_reference_set(ref_path, spec)
    traffic = load_traffic(config, spec, list(parent.card.labels))
    model = load_keras_model(parent.dir)
    before = measure_parent(model, parent, traffic, reference, config)
    # Everything about the parent is measured: the same model becomes the candidate
    # (one load, and the traced forward passes above serve the candidate too).
    rng = np.random.default_rng(config.seed)
    stats = reestimate_statistics(model, traffic.x[traffic.split.fit], rng, config.batch_size)
    prior = choose_prior(model, stats, parent, traffic, reference, before, config)
    stats.assign(prior[0])
    after = fine_tune_and_measure(model, stats, prior[0], traffic, reference, before, config)
    temperature, calibration, t_fit = fit_temperature(traffic, before, after, parent, config)
    drift = (before.drift, stats.source_weight(prior[0]))
    judged = judged_evidence(traffic, reference, before, after)
    checks, acc_traffic, parity = gate(
        model, parent, traffic, reference, judged, drift, rng, config
    )
    samples = samples_summary(
        config.samples_dir, traffic.data, traffic.split, traffic.n_labelled, traffic.invalid_labels
    )
    drifted = before.domain_shift
    lineage = lineage_entry(
        parent, _method(after), stats, after.fine_tune, prior, samples, temperature, drifted, checks
    )
    candidate = CandidateExport(
        model=model,
        task="classification",
        spec=spec,
        labels=list(parent.card.labels),
        postprocess=classifier_postprocess(temperature),
        card_fields=candidate_card_fields(
            parent.card,
            metrics=card_metrics(acc_traffic, after.reference_accuracy, parity),
            x_fit=traffic.x[traffic.split.fit],
            calibration=calibration,
            lineage=lineage,
        ),
        extra_files={REFERENCE_SET: ref_bytes},
    )
    published = export_and_publish(
        parent, candidate, traffic.x, traffic.split, checks, promote=config.promote
    )
    accuracy = {"reference_set": reference_accuracies(before, after), "traffic": acc_traffic}
    return published.result(checks, temperature, t_fit, accuracy, samples, prior)


def reference_accuracies(before: ParentMeasures, after: CandidateMeasures) -> dict[str, float]:
    """The result's reference-set accuracies, parent and candidate."""
    return {"parent": before.reference_accuracy, "candidate": after.reference_accuracy}


def _method(after: CandidateMeasures) -> str:
    """The lineage's ``method``: AdaBN, and the fine-tuning when it ran."""
    return "adabn-precise-bn" + ("+feedback-fine-tune" if after.fine_tune["ran"] else "")


def load_reference_set(path: Path, spec: PreprocessSpec) -> XY:
    """The version's shipped reference set as model inputs and class indices."""
    with np.load(path) as ref:
        return normalize(ref["pixels"], spec), ref["labels"].astype(np.int64)


def load_traffic(
    config: CalibrationConfig, spec: PreprocessSpec, class_names: list[str]
) -> Traffic:
    """The newest captured samples with their labels as class indices, split by request."""
    data = load_enough_samples(
        config.samples_dir, config.name, spec, config.max_samples, config.min_samples
    )
    y, invalid = label_indices(data.labels, class_names)
    labelled = y >= 0
    return Traffic(
        data=data,
        x=data.inputs,
        y=y,
        labelled=labelled,
        split=split_samples(data, config.holdout_fraction),
        invalid_labels=invalid,
        enough_labels=int(labelled.sum()) >= config.min_labelled,
    )


def measure_parent(
    model: keras.Model,
    parent: StableParent,
    traffic: Traffic,
    reference: XY,
    config: CalibrationConfig,
) -> ParentMeasures:
    """The parent's logits, reference-set accuracy, drift alarm, and whether the domain moved."""
    bs = config.batch_size
    parent_logits = logits(model, traffic.x, bs)
    ref_acc = accuracy(model, *reference, bs)
    drift = parent_drift(model, parent.card, parent.probe_names, traffic.x[traffic.split.held], bs)
    shifted = drift.drifted
    if traffic.enough_labels and not shifted:
        # Labels are evidence of a domain shift too: the parent doing clearly worse on
        # the labelled traffic than on its own reference set means another domain.
        lab = traffic.labelled
        traffic_acc = float(np.mean(parent_logits[lab].argmax(-1) == traffic.y[lab]))
        shifted = traffic_acc < ref_acc - LABELLED_SHIFT_MARGIN
    return ParentMeasures(parent_logits, ref_acc, drift, shifted)


def choose_prior(
    model: keras.Model,
    stats: Reestimation,
    parent: StableParent,
    traffic: Traffic,
    reference: XY,
    before: ParentMeasures,
    config: CalibrationConfig,
) -> tuple[float, list[dict[str, Any]]]:
    """The prior strength asked for, or for ``"auto"`` the best weight on labelled fit samples.

    Without enough labels there is nothing to judge a mix on: the samples alone (0).
    """
    if config.prior_strength != "auto":
        return float(config.prior_strength), []
    lab, fit, bs = traffic.labelled, traffic.split.fit, config.batch_size
    fit_labelled = lab & fit if (lab & fit).sum() >= config.min_labelled // 2 else lab
    if not traffic.enough_labels or not fit_labelled.any():
        return 0.0, []
    lx, ly = traffic.x[fit_labelled], traffic.y[fit_labelled]

    def rank(t: dict[str, Any]) -> tuple[float, float]:
        return t["labelled_accuracy"], -t["source_weight"]

    return search_prior(
        stats,
        lambda w: {
            "labelled_accuracy": accuracy(model, lx, ly, bs),
            "reference_accuracy": accuracy(model, *reference, bs),
        },
        traffic_drifts(model, parent.probe_names, traffic.x[traffic.split.held], before.drift, bs),
        reference_key="reference_accuracy",
        floor=before.reference_accuracy - config.accuracy_tolerance,
        rank=rank,
        fallback_rank=rank,
    )


def fine_tune_and_measure(
    model: keras.Model,
    stats: Reestimation,
    prior_strength: float,
    traffic: Traffic,
    reference: XY,
    before: ParentMeasures,
    config: CalibrationConfig,
) -> CandidateMeasures:
    """Fine-tune on labelled feedback when the traffic drifted; measure the candidate."""
    tuned = fine_tune_share(traffic.labelled, traffic.split.fit, traffic.split.unit, config)
    why_not = why_not_fine_tuned(config, before.domain_shift, int(tuned.sum()))
    if why_not is None:
        fine_tune = fine_tune_candidate(
            model, stats, prior_strength, (traffic.x[tuned], traffic.y[tuned]), reference, config
        )
    else:
        fine_tune = {"ran": False, "why_not": why_not}
        tuned[:] = False
    return CandidateMeasures(
        logits=logits(model, traffic.x, config.batch_size),
        reference_accuracy=accuracy(model, *reference, config.batch_size),
        fine_tune=fine_tune,
        tuned=tuned,
        unseen=traffic.labelled & ~tuned,
    )


def fit_temperature(
    traffic: Traffic,
    before: ParentMeasures,
    after: CandidateMeasures,
    parent: StableParent,
    config: CalibrationConfig,
) -> tuple[float, dict[str, Any], TemperatureFit | None]:
    """The temperature to serve, the card's ``calibration`` entry, and the fit (if kept)."""
    if not traffic.enough_labels:
        note = (
            f"{traffic.n_labelled} labelled samples (< {config.min_labelled}): "
            "the parent's temperature is kept"
        )
        return parent.temperature, inherited_calibration(parent.temperature, note), None
    unseen, fit, y = after.unseen, traffic.split.fit, traffic.y
    fit_l = unseen & fit if (unseen & fit).sum() >= config.min_labelled // 2 else unseen
    held_l = traffic.labelled & traffic.split.held & ~fit_l
    eval_l = held_l if held_l.sum() >= MIN_TEMPERATURE_EVALUATION else fit_l
    return fit_served_temperature(
        (after.logits[fit_l], y[fit_l]),
        (after.logits[eval_l], y[eval_l]),
        before.logits[eval_l],
        parent.temperature,
        in_sample=bool(np.array_equal(eval_l, fit_l)),
    )


def judged_evidence(
    traffic: Traffic, reference: XY, before: ParentMeasures, after: CandidateMeasures
) -> Judged:
    """What the classifier gate compares, parent against candidate."""
    return Judged(
        y=traffic.y,
        labelled=traffic.labelled,
        unseen=after.unseen,
        tuned=after.tuned,
        enough_labels=traffic.enough_labels,
        parent_logits=before.logits,
        candidate_logits=after.logits,
        parent_reference=before.reference_accuracy,
        candidate_reference=after.reference_accuracy,
        reference_images=int(len(reference[1])),
        domain_shift=before.domain_shift,
        fine_tuned=bool(after.fine_tune["ran"]),
    )


def gate(
    model: keras.Model,
    parent: StableParent,
    traffic: Traffic,
    reference: XY,
    judged: Judged,
    drift: tuple[ParentDrift, float],
    rng: np.random.Generator,
    config: CalibrationConfig,
) -> tuple[list[GateCheck], dict[str, Any], dict[str, Any]]:
    """Every check but the export's, the traffic accuracies, and the card's parity entry.

    ``drift`` is the parent's drift alarm and the candidate's source weight.
    """
    checks = [class_balance_check(judged, list(parent.card.labels), config)]
    traffic_checks, acc_traffic = traffic_accuracy_checks(judged, traffic.n_labelled, config)
    checks += traffic_checks
    checks.append(reference_accuracy_check(judged, config.accuracy_tolerance))
    lab = traffic.labelled
    evaluated = (
        (traffic.x[lab], traffic.y[lab], "labelled_traffic")
        if traffic.enough_labels
        else (*reference, "reference_set")
    )
    parity, parity_metrics = parity_check(
        model, evaluated, parity_threshold(parent.card, config), rng, config.batch_size
    )
    checks.append(parity)
    checks.append(
        drift_check(
            model,
            parent.probe_names,
            traffic.x[traffic.split.held],
            drift[0],
            source_weight=drift[1],
            held_out=bool(traffic.split.holdout.any()),
            batch_size=config.batch_size,
        )
    )
    return checks, acc_traffic, parity_metrics


def card_metrics(
    acc_traffic: dict[str, Any], reference_accuracy: float, parity: dict[str, Any]
) -> dict[str, Any]:
    """The candidate card's ``metrics``: accuracy on labelled traffic, else the reference set."""
    return {
        "accuracy": acc_traffic["candidate"] if acc_traffic else reference_accuracy,
        "accuracy_on": "labelled_traffic" if acc_traffic else "reference_set",
        "reference_set_accuracy": reference_accuracy,
        "parity": parity,
        "evaluated_in": "inference_mode",
    }
