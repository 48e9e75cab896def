"""Online calibration: captured traffic -> re-estimated BN statistics -> gated new version.

This describes classifiers; a detector's calibration shares the sample split,
statistics, drift and staleness checks and publishing helpers below, and gates
on mAP instead (:mod:`calibration.detector`).

``calibrate`` takes the version labelled ``stable``, and:

1. loads its Keras model (``assets.extra/model.keras``), model card and shipped
   reference set, and the newest captured samples of the model
   (:mod:`calibration.capture_store`) with their feedback labels;
2. splits the samples by request id into a fit part and a held-out part, and
   re-estimates the statistics of *every* BN layer on the fit part with
   :func:`contract.bn.precise_bn` (AdaBN; optionally mixed with the source
   statistics by ``prior_strength``; ``"auto"`` chooses it, see below). Layers
   frozen at training time are unfrozen for the pass, so each layer sees its
   input normalised by the new statistics upstream, and re-frozen before saving;
3. when the traffic has drifted (below) and at least ``min_fine_tune_labels``
   labelled fit samples fall in the fine-tuning share (``fine_tune_fraction``
   of them by request id, all by default), fine-tunes the weights on them plus
   the reference set for ``fine_tune_epochs`` (:func:`fine_tune_on_feedback`:
   BN frozen in inference mode under the new statistics, collected again after
   every epoch). Re-estimated statistics alone cannot undo what a shift
   destroys (noise); labelled feedback from the new domain can teach the
   weights to read it. Every later check on labelled traffic is judged on
   labelled samples the fine-tuning did not see;
4. fits a temperature (:mod:`calibration.temperature`) on the labelled fit samples
   not fine-tuned on (after fine-tuning on all of them: on the labelled
   held-out ones, and the report says ``in_sample``) when there are at least
   ``min_labelled`` labelled ones, reports NLL/ECE at T=1 and at T on the
   labelled held-out samples, and exports the temperature in the graph
   (``classifier_postprocess(T)``). A temperature the feedback does not
   determine (no labelled fit sample misclassified, or a fit at a search bound)
   is not served: the parent's is kept (:func:`fit_served_temperature`);
5. gates the candidate (every check is computed and reported):

   - ``class_balance``: no class dominates the samples (labels, else the
     candidate's predictions): statistics of one class are not a domain;
   - ``accuracy_traffic``: on the labelled samples not fine-tuned on, the
     candidate is not worse than the parent by more than ``accuracy_tolerance``, and
     ``above_chance``: it beats the majority-class rate by ``min_accuracy_lift``;
   - ``accuracy_reference``: on the version's shipped reference set, the
     candidate is not worse than the parent by more than ``accuracy_tolerance``.
     It gates unless the captured traffic is drifted under the parent's
     statistics (drift above the alarm threshold, or the parent's accuracy on
     the labelled traffic ``LABELLED_SHIFT_MARGIN`` below its reference-set
     accuracy) *and* there is labelled traffic to judge on: statistics adapted
     to a shifted domain are, by design, worse on the source domain, and the
     labelled traffic is then the evidence about the domain being served;
   - ``parity``: inference mode vs training mode (batch statistics) on the
     labelled samples (else on the reference set);
   - ``drift``: the held-out traffic's drift score under the candidate's
     statistics is below the parent's alarm threshold at every probe layer
     (with a prior, plus the residual the source weight leaves by design:
     :func:`residual_limits`);
   - ``statistics_converged``: the export's staleness check on the fit samples;
6. publishes a passing candidate atomically as version N+1 with ``lineage``
   (parent, samples, prior, temperature, gate) and points ``canary`` (or
   ``stable``) at it; a failing one goes to ``<name>/rejected/<N+1>`` with the
   reasons, and ``models.config`` is not touched.

``prior_strength="auto"`` (the default of the command line) tries source
weights N/(N+n) in :data:`AUTO_SOURCE_WEIGHTS` on the one collected set of
statistics and keeps the one with the best accuracy on the labelled *fit*
samples among those within ``accuracy_tolerance`` of the parent on the
reference set and that leave the held-out traffic below the drift alarm (the
most adapted one on ties): full adaptation when the source domain does not
suffer, a mix when it would. Without enough labels it is 0.
Every weight tried is recorded in the lineage.

Label moves are appended to ``<name>/label_history.jsonl``; :func:`rollback`
uses it to move ``stable`` back to the version it pointed at before.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from calibration.capture_store import SampleSet, load_samples
from calibration.temperature import (
    ECE_BINS,
    TemperatureFit,
    calibration_report,
    fit_and_evaluate,
)
from contract import bn, drift_scores
from contract.export import export_model, pixel_statistics
from contract.model_card import (
    KERAS_MODEL_RELPATH,
    REQUIRED,
    load_model_card,
    write_model_card,
)
from contract.preprocessing import PreprocessSpec, normalize
from contract.repository import ModelRepository, RepositoryError
from training.classifier import REFERENCE_SET, classifier_postprocess

PROMOTE_LABELS = ("canary", "stable")
#: Parent accuracy on labelled traffic this far below its reference-set accuracy
#: counts as a domain shift (as drift above the alarm threshold does).
LABELLED_SHIFT_MARGIN = 0.1
#: Source weights N/(N+n) that ``prior_strength="auto"`` tries (0: the samples alone).
#: Finer near 0: the drift alarm tolerates only a little of the source mixed in.
AUTO_SOURCE_WEIGHTS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.35, 0.5, 0.65, 0.8)
#: CLI exit codes.
EXIT_PUBLISHED = 0
EXIT_REJECTED = 3
EXIT_NOT_ENOUGH_SAMPLES = 4
EXIT_ERROR = 5
#: Card keys ``export_model`` writes itself; everything else is carried from the parent.
_EXPORT_OWNED = set(REQUIRED)


class CalibrationError(RuntimeError):
    """Calibration cannot run as asked (no stable version, unsupported model, bad input)."""


class NotEnoughSamplesError(CalibrationError):
    """Too few captured samples to re-estimate statistics from."""


class LabelError(CalibrationError):
    """A promotion or rollback that cannot be done."""


@dataclass
class GateCheck:
    """One gate check: ``gating`` checks decide, the others are reported only."""

    name: str
    passed: bool
    gating: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CalibrationResult:
    """What a calibration run did and measured."""

    name: str
    status: str  # "published" | "rejected"
    version: int
    path: Path
    parent_version: int
    labels_moved: dict[str, int]
    checks: list[GateCheck]
    temperature: float
    temperature_fit: TemperatureFit | None
    accuracy: dict[str, Any]
    samples: dict[str, Any]
    prior_strength: float = 0.0
    prior_search: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "published"

    @property
    def reasons(self) -> list[str]:
        """Why the gate rejected the candidate (empty when it passed)."""
        return [c.reason for c in self.checks if c.gating and not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "version": self.version,
            "path": str(self.path),
            "parent_version": self.parent_version,
            "labels_moved": self.labels_moved,
            "reasons": self.reasons,
            "gate": [c.to_dict() for c in self.checks],
            "temperature": self.temperature,
            "temperature_fit": None
            if self.temperature_fit is None
            else self.temperature_fit.to_dict(),
            "accuracy": self.accuracy,
            "samples": self.samples,
            "prior_strength": self.prior_strength,
            "prior_search": self.prior_search,
        }


# -- helpers ----------------------------------------------------------------


def _request_unit(request_ids: list[str]) -> np.ndarray:
    """A uniform number in [0, 1) per request id: splits keep one request's images together."""
    return np.array(
        [int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) / 2**32 for r in request_ids]
    )


def fine_tune_on_feedback(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    learning_rate: float,
    reestimate: Callable[[], None],
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Supervised fine-tuning on labelled feedback ``(x, y)`` plus the reference set.

    BN layers stay in inference mode and frozen (statistics and affine): the
    weights learn under the normalisation the exported graph applies, by the
    statistics re-estimated on the traffic. Changed weights change what each BN
    layer downstream receives, so after every epoch ``reestimate()`` collects the
    statistics again (it is called with the BN layers frozen and must leave them
    so) and the next epoch learns under those; the last epoch's statistics
    describe the final weights, as the staleness check and the drift monitor
    need. The other layers train as the parent left them (its frozen backbone
    stays frozen). The reference set (source domain) is mixed in so the source
    domain is not forgotten. Adam, shuffled mini-batches. Returns what the
    lineage records.
    """
    layers = bn.bn_layers(model)
    flags = [layer.trainable for layer in layers]
    xs = np.concatenate([x, reference[0]]).astype(np.float32)
    ys = np.concatenate([y, reference[1]]).astype(np.int64)
    try:
        for layer in layers:
            layer.trainable = False
        variables = model.trainable_variables
        optimizer = keras.optimizers.Adam(learning_rate)
        optimizer.build(variables)  # slot variables before tracing: one trace, not two
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, *xs.shape[1:]], tf.float32),
                tf.TensorSpec([None], tf.int64),
            ]
        )
        def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=False))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            return loss

        rng = np.random.default_rng(seed)
        losses = []
        started = time.monotonic()
        for _ in range(epochs):
            order = rng.permutation(len(ys))
            epoch = [
                float(step(tf.constant(xs[idx]), tf.constant(ys[idx])))
                for idx in np.array_split(order, max(1, round(len(order) / batch_size)))
            ]
            losses.append(float(np.mean(epoch)))
            reestimate()
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.trainable = flag
    return {
        "method": "supervised, BN frozen in inference mode",
        "epochs": epochs,
        "learning_rate": learning_rate,
        "feedback_images": int(len(y)),
        "reference_images": int(len(reference[1])),
        "trainable_variables": len(variables),
        "loss_by_epoch": losses,
        "seconds": round(time.monotonic() - started, 1),
    }


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


def _label_indices(labels: list[Any], class_names: list[str]) -> tuple[np.ndarray, int]:
    """Feedback labels as class indices (-1: none); also how many were not valid classes."""
    out = np.full(len(labels), -1, dtype=np.int64)
    invalid = 0
    for i, lab in enumerate(labels):
        if lab is None:
            continue
        if isinstance(lab, str) and lab in class_names:
            out[i] = class_names.index(lab)
        elif isinstance(lab, int | np.integer) and 0 <= int(lab) < len(class_names):
            out[i] = int(lab)
        else:
            invalid += 1
    return out, invalid


def _load_keras(version_dir: Path) -> keras.Model:
    # compile=False: only the graph and weights are needed; the optimizer's custom
    # learning-rate schedule does not have to be importable.
    return keras.models.load_model(version_dir / KERAS_MODEL_RELPATH, compile=False)


def _logits(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return bn.predict_in_mode(model, x, training=False, batch_size=batch_size)


def _probe_moments(model: keras.Model, names: list[str], x: np.ndarray, batch_size: int):
    """Per-image ``bn_input_mean``/``bn_input_sqmean`` in inference mode (the signature's)."""

    def build(m: keras.Model):
        collector = bn.bn_input_model(m, bn.probe_layers(m, names))

        def moments(x: tf.Tensor):
            outs = collector(x, training=False)
            return bn.probe_moments(list(outs) if isinstance(outs, list | tuple) else [outs])

        return moments

    fn = bn.traced(model, ("probe_moments", tuple(names)), x.shape, build)
    means, sqmeans = [], []
    for i in range(0, len(x), batch_size):
        m, s = fn(tf.convert_to_tensor(x[i : i + batch_size], tf.float32))
        means.append(m.numpy())
        sqmeans.append(s.numpy())
    return np.concatenate(means), np.concatenate(sqmeans)


def try_source_weights(
    layers: list[keras.layers.BatchNormalization],
    target: list[bn.BNStatistics],
    source: list[tuple[np.ndarray, np.ndarray]],
    measure: Callable[[float], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Assign each of :data:`AUTO_SOURCE_WEIGHTS` in turn and record ``measure(w)``.

    Weight w on the source is prior strength N = w / (1 - w) x n (n: the target's
    images). The last weight tried stays assigned; the caller assigns its choice.
    """
    n = target[0].images
    tried = []
    for w in AUTO_SOURCE_WEIGHTS:
        strength = w / (1.0 - w) * n
        bn.assign_statistics(layers, target, source, prior_strength=strength)
        tried.append({"source_weight": w, "prior_strength": strength, **measure(w)})
    return tried


def _choose_prior(
    model: keras.Model,
    layers: list[keras.layers.BatchNormalization],
    target: list[bn.BNStatistics],
    source: list[tuple[np.ndarray, np.ndarray]],
    labelled: tuple[np.ndarray, np.ndarray] | None,
    reference: tuple[np.ndarray, np.ndarray],
    reference_floor: float,
    batch_size: int,
    drifts: Callable[[float], bool] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """The prior strength for ``prior_strength="auto"`` and every weight tried (module docstring).

    ``drifts(w)`` says whether the held-out traffic still exceeds the alarm
    limits (:func:`residual_limits` for weight w) under the statistics assigned
    now: a weight that leaves the traffic drifted would fail the gate, so it is
    chosen only when every weight does.
    """
    if labelled is None or len(labelled[1]) == 0:
        return 0.0, []
    tried = try_source_weights(
        layers,
        target,
        source,
        lambda w: {
            "labelled_accuracy": float(
                np.mean(_logits(model, labelled[0], batch_size).argmax(-1) == labelled[1])
            ),
            "reference_accuracy": float(
                np.mean(_logits(model, reference[0], batch_size).argmax(-1) == reference[1])
            ),
            "traffic_drifts": bool(drifts(w)) if drifts is not None else False,
        },
    )
    within = [t for t in tried if t["reference_accuracy"] >= reference_floor]
    eligible = [t for t in within if not t["traffic_drifts"]] or within or tried
    best = max(eligible, key=lambda t: (t["labelled_accuracy"], -t["source_weight"]))
    return best["prior_strength"], tried


def drift_exceedances(
    model: keras.Model,
    probe_names: list[str],
    x: np.ndarray,
    thresholds: dict[str, dict[str, float]],
    *,
    batch_size: int = 64,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Drift scores of ``x`` pooled as one window under ``model``'s statistics.

    Returns the scores per layer and the ``layer.score=value > threshold``
    failures against ``thresholds`` (the alarm thresholds of a model card).
    """
    m, s = _probe_moments(model, probe_names, x, batch_size)
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


def residual_limits(
    thresholds: dict[str, dict[str, float]],
    parent_scores: dict[str, dict[str, float]],
    source_weight: float,
) -> dict[str, dict[str, float]]:
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


def _says(passed: bool, failure: str, facts: str) -> str:
    """A check's reason: the facts, led by what is wrong when it failed."""
    return facts if passed else f"{failure}: {facts}"


def _largest_share(values: np.ndarray) -> tuple[float, int | None]:
    if len(values) == 0:
        return 0.0, None
    cls, count = Counter(values.tolist()).most_common(1)[0]
    return count / len(values), int(cls)


def load_enough_samples(
    samples_dir: str | os.PathLike[str],
    name: str,
    spec: PreprocessSpec,
    max_samples: int,
    min_samples: int,
) -> SampleSet:
    """The newest captured samples of ``name``; :class:`NotEnoughSamplesError` below the minimum."""
    shape = (spec.height, spec.width, spec.channels)
    data = load_samples(samples_dir, name, max_samples=max_samples, input_shape=shape)
    if len(data) < min_samples:
        raise NotEnoughSamplesError(
            f"{len(data)} usable samples of {name} in {samples_dir} (need {min_samples})"
            + (f"; skipped {data.skipped}" if data.skipped else "")
        )
    return data


def split_samples(
    data: SampleSet, holdout_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(unit, holdout, fit, held)`` masks: a request's images stay on one side.

    ``held`` is what the held-out checks run on: the held-out part, or every
    sample (in-sample) when there are too few to split.
    """
    unit = _request_unit(data.request_ids)
    holdout = unit < holdout_fraction
    if holdout.sum() < 8 or (~holdout).sum() < 8:
        holdout[:] = False  # too few to split: everything fits, the held-out checks run in-sample
    fit = ~holdout
    held = holdout if holdout.any() else fit
    return unit, holdout, fit, held


def statistics_collector(
    model: keras.Model,
    layers: list[keras.layers.BatchNormalization],
    x_fit: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
) -> Callable[[], list[bn.BNStatistics]]:
    """A function collecting precise-BN statistics of every BN layer's input on ``x_fit``.

    Batches are drawn once in a random order (i.i.d., not capture order). BN
    layers frozen at training time are unfrozen for the pass (a frozen BN layer
    runs in inference mode even in training mode) and re-frozen after.
    """
    order = rng.permutation(len(x_fit))
    batches = [x_fit[idx] for idx in np.array_split(order, max(1, round(len(order) / batch_size)))]

    def collect() -> list[bn.BNStatistics]:
        flags = [layer.trainable for layer in layers]
        try:
            for layer in layers:
                layer.trainable = True
            return bn.collect_bn_statistics(model, batches, layers=layers)
        finally:
            for layer, flag in zip(layers, flags, strict=True):
                layer.trainable = flag

    return collect


def drift_check(
    candidate: keras.Model,
    probe_names: list[str],
    x_held: np.ndarray,
    thresholds: dict[str, dict[str, float]],
    parent_scores: dict[str, dict[str, float]],
    parent_exceed: list[str],
    *,
    source_weight: float,
    held_out: bool,
    batch_size: int = 64,
) -> GateCheck:
    """The ``drift`` check: held-out traffic under the candidate's statistics vs the alarm."""
    if not thresholds:
        return GateCheck(
            "drift", True, False, "not checked: the parent's card has no bn_reference.drift", {}
        )
    limits = residual_limits(thresholds, parent_scores, source_weight)
    cand_scores, exceed = drift_exceedances(
        candidate, probe_names, x_held, limits, batch_size=batch_size
    )
    return GateCheck(
        "drift",
        not exceed,
        True,
        _says(
            not exceed,
            "held-out traffic still drifts under the candidate's statistics",
            "; ".join(exceed)
            or f"below the alarm thresholds on {len(x_held)} held-out images"
            + (
                f" (plus the residual of source weight {source_weight:.3g})"
                if source_weight
                else ""
            ),
        ),
        {
            "candidate_scores": cand_scores,
            "limits": limits,
            "source_weight": source_weight,
            "parent_scores": parent_scores,
            "parent_exceedances": parent_exceed,
            "images": len(x_held),
            "held_out": held_out,
        },
    )


def samples_summary(
    samples_dir: str | os.PathLike[str],
    data: SampleSet,
    fit: np.ndarray,
    holdout: np.ndarray,
    labelled: int,
    invalid_labels: int,
) -> dict[str, Any]:
    """The lineage's ``samples`` entry: what was used, from when, and a fingerprint."""
    return {
        "store": str(Path(samples_dir).resolve()),
        "used": int(len(data)),
        "fit": int(fit.sum()),
        "held_out": int(holdout.sum()),
        "labelled": labelled,
        "invalid_labels": invalid_labels,
        "skipped": data.skipped,
        "versions": {str(k): int(v) for k, v in Counter(data.versions.tolist()).items()},
        "captured_from": float(data.captured_at.min()),
        "captured_to": float(data.captured_at.max()),
        "fingerprint": hashlib.sha256("\n".join(sorted(data.request_ids)).encode()).hexdigest()[
            :16
        ],
    }


def export_and_publish(
    repo: ModelRepository,
    name: str,
    candidate: keras.Model,
    *,
    card: dict[str, Any],
    task: str,
    spec: PreprocessSpec,
    labels: list[str],
    postprocess: Callable,
    probe_names: list[str],
    card_fields: dict[str, Any],
    x: np.ndarray,
    fit: np.ndarray,
    held: np.ndarray,
    extra_files: dict[str, bytes],
    checks: list[GateCheck],
    promote: str,
    parent_version: int,
) -> tuple[bool, int, Path, dict[str, int]]:
    """Export the candidate privately, add the staleness check, then publish or reject.

    Returns ``(passed, version, path, labels_moved)``. A passing candidate is
    published as the next version and ``promote`` points at it; a failing one
    goes to ``<name>/rejected/<version>`` with ``rejection.json``. ``checks``
    gets the ``statistics_converged`` check appended.
    """
    drift_x = x[held] if len(x[held]) >= 16 else x
    window = int(card["bn_reference"].get("drift", {}).get("window", drift_scores.DEFAULT_WINDOW))
    private = repo.base / name / f".calibrate-{secrets.token_hex(6)}"
    try:
        exported = export_model(
            candidate,
            model_base=private,
            name=name,
            task=task,
            spec=spec,
            labels=labels,
            postprocess=postprocess,
            probe_layers=probe_names,
            card_fields=card_fields,
            warmup_images=x[:8],
            version_labels=(),
            extra_files=extra_files,
            drift_images=drift_x,
            staleness_images=x[fit],
            drift_window=min(window, max(16, len(drift_x) // 2)),
            force=True,  # a stale candidate is rejected below, with the reason, and kept
        )
        stale = exported.card.get("metrics", {}).get("staleness")
        if stale is not None:
            checks.append(
                GateCheck(
                    "statistics_converged",
                    bool(stale["passed"]),
                    True,
                    _says(
                        bool(stale["passed"]),
                        "the statistics do not describe the samples they were estimated on",
                        "; ".join(stale["failures"])
                        or "the fit samples score below the candidate's alarm thresholds",
                    ),
                    {"failures": stale["failures"], "images": stale["images"]},
                )
            )
        passed = all(c.passed for c in checks if c.gating)
        new_card = dict(exported.card)
        new_card["lineage"] = {
            **new_card["lineage"],
            "gate": {"passed": passed, "checks": [c.to_dict() for c in checks]},
        }
        moved: dict[str, int] = {}
        with repo.lock():
            version = repo.next_version(name)
            new_card["version"] = version
            write_model_card(exported.path, new_card)
            if passed:
                repo.publish(name, exported.path, version)
                path = repo.version_dir(name, version)
                _move_label(repo, name, promote, version, "calibrate", parent=int(parent_version))
                moved[promote] = version
            else:
                reasons = [c.reason for c in checks if c.gating and not c.passed]
                (exported.path / "assets.extra" / "rejection.json").write_text(
                    json.dumps(
                        {"reasons": reasons, "gate": [c.to_dict() for c in checks]},
                        indent=1,
                        default=float,
                    )
                    + "\n"
                )
                path = repo.reject(name, exported.path, version)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return passed, version, path, moved


# -- label moves and history --------------------------------------------------


def _append_history(repo: ModelRepository, name: str, record: dict[str, Any]) -> None:
    path = repo.history_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **record}
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_label_history(model_base: str | os.PathLike[str], name: str) -> list[dict[str, Any]]:
    """Every recorded label move of ``name``, oldest first."""
    path = ModelRepository(model_base).history_path(name)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _move_label(
    repo: ModelRepository, name: str, label: str, version: int, action: str, **extra
) -> int | None:
    """Point ``label`` at ``version`` in models.config and record it (caller holds the lock)."""
    previous = repo.labels(name).get(label)
    try:
        repo.set_labels(name, {label: version})
    except RepositoryError as exc:
        raise LabelError(str(exc)) from exc
    _append_history(
        repo,
        name,
        {"action": action, "label": label, "version": int(version), "previous": previous, **extra},
    )
    return previous


def _label_stack(history: list[dict[str, Any]], label: str, current: int | None) -> list[int]:
    """The versions ``label`` pointed at, oldest first, with rolled-back ones removed."""
    stack: list[int] = []
    for rec in history:
        if rec.get("label") != label:
            continue
        if rec["action"] == "rollback":
            if stack and stack[-1] == rec.get("previous"):
                stack.pop()
        elif rec.get("previous") is not None and (not stack or stack[-1] != rec["previous"]):
            stack.append(int(rec["previous"]))
        if not stack or stack[-1] != rec["version"]:
            stack.append(int(rec["version"]))
    # A label set outside this history (an export) is where the label points now.
    if current is not None and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def promote(
    model_base: str | os.PathLike[str], name: str, version: int, label: str = "stable"
) -> int | None:
    """Point ``label`` at a published ``version``; returns the version it pointed at before."""
    repo = ModelRepository(model_base)
    with repo.lock():
        if int(version) not in repo.versions(name):
            raise LabelError(f"{name} has no published version {version}")
        return _move_label(repo, name, label, int(version), "promote")


def rollback(
    model_base: str | os.PathLike[str], name: str, label: str = "stable"
) -> tuple[int, int]:
    """Move ``label`` back to the version it pointed at before; returns (from, to).

    Repeated rollbacks walk further back through the label history; versions
    no longer on disk are skipped.
    """
    repo = ModelRepository(model_base)
    with repo.lock():
        current = repo.labels(name).get(label)
        if current is None:
            raise LabelError(f"{name} has no {label!r} label to roll back")
        stack = _label_stack(read_label_history(model_base, name), label, current)
        on_disk = set(repo.versions(name))
        candidates = [v for v in stack[:-1] if v in on_disk and v != current]
        if not candidates:
            raise LabelError(f"{name}: no earlier {label!r} version to roll back to")
        target = candidates[-1]
        repo.set_labels(name, {label: target})
        _append_history(
            repo,
            name,
            {"action": "rollback", "label": label, "version": target, "previous": current},
        )
        return current, target


# -- calibrate ----------------------------------------------------------------


def calibrate(
    model_base: str | os.PathLike[str],
    name: str,
    samples_dir: str | os.PathLike[str],
    *,
    prior_strength: float | str = 0.0,
    min_samples: int = 64,
    min_labelled: int = 32,
    accuracy_tolerance: float = 0.02,
    promote: str = "canary",
    max_samples: int = 2048,
    holdout_fraction: float = 0.25,
    max_class_share: float = 0.75,
    min_accuracy_lift: float = 0.1,
    parity_threshold: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    fine_tune_epochs: int = 4,
    fine_tune_learning_rate: float = 3e-4,
    min_fine_tune_labels: int = 96,
    fine_tune_fraction: float = 1.0,
) -> CalibrationResult:
    """Calibrate the ``stable`` version of ``name`` on captured samples (module docstring).

    ``samples_dir`` is the capture store root (samples of ``name`` are in
    ``<samples_dir>/<name>``). Raises :class:`NotEnoughSamplesError` below
    ``min_samples`` images, :class:`CalibrationError` when there is no stable
    version or the task is neither classification nor detection (detectors:
    :func:`calibration.detector.calibrate_detector`; the classifier-only
    options do not apply to them). A rejected candidate is not an
    exception: the result's ``status`` is ``"rejected"`` with ``reasons``.
    """
    if promote not in PROMOTE_LABELS:
        raise ValueError(f"promote must be one of {PROMOTE_LABELS}, got {promote!r}")
    if prior_strength != "auto" and (
        isinstance(prior_strength, str) or prior_strength < 0  # type: ignore[operator]
    ):
        raise ValueError(f"prior_strength must be >= 0 or 'auto', got {prior_strength!r}")
    if min_samples < 1 or min_labelled < 1 or not 0 <= holdout_fraction < 1:
        raise ValueError("min_samples >= 1, min_labelled >= 1, 0 <= holdout < 1")
    if fine_tune_epochs < 0 or fine_tune_learning_rate <= 0 or not 0 < fine_tune_fraction <= 1:
        raise ValueError("fine_tune_epochs >= 0, fine_tune_learning_rate > 0, 0 < fraction <= 1")
    repo = ModelRepository(model_base)
    parent_version = repo.labels(name).get("stable")
    if parent_version is None:
        raise CalibrationError(f"{name} has no version labelled 'stable' in {repo.config_path}")
    parent_dir = repo.version_dir(name, parent_version)
    card = load_model_card(parent_dir)
    if card["task"] == "detection":
        from calibration.detector import calibrate_detector  # imports this module

        return calibrate_detector(
            model_base,
            name,
            samples_dir,
            prior_strength=prior_strength,
            min_samples=min_samples,
            accuracy_tolerance=accuracy_tolerance,
            promote=promote,
            max_samples=max_samples,
            holdout_fraction=holdout_fraction,
            max_class_share=max_class_share,
            parity_threshold=parity_threshold,
            batch_size=batch_size,
            seed=seed,
        )
    if card["task"] != "classification":
        raise CalibrationError(
            f"calibration supports classifiers and detectors; {name} is {card['task']}"
        )
    spec = PreprocessSpec.from_dict(card["preprocessing"])
    class_names = list(card["labels"])
    probe_names = [p["name"] for p in card["bn_reference"]["probes"]]
    ref_path = (
        parent_dir / "assets.extra" / card.get("reference_set", {}).get("file", REFERENCE_SET)
    )
    if not ref_path.exists():
        raise CalibrationError(
            f"version {parent_version} of {name} ships no reference set ({ref_path})"
        )
    ref_bytes = ref_path.read_bytes()
    with np.load(ref_path) as ref:
        ref_x, ref_y = normalize(ref["pixels"], spec), ref["labels"].astype(np.int64)

    # -- samples --------------------------------------------------------------
    data = load_enough_samples(samples_dir, name, spec, max_samples, min_samples)
    x = data.inputs
    y, invalid_labels = _label_indices(data.labels, class_names)
    labelled = y >= 0
    unit, holdout, fit, held = split_samples(data, holdout_fraction)
    n_lab = int(labelled.sum())
    enough_labels = n_lab >= min_labelled

    # -- parent ---------------------------------------------------------------
    parent = _load_keras(parent_dir)
    parent_logits = _logits(parent, x, batch_size)
    parent_ref_acc = float(np.mean(_logits(parent, ref_x, batch_size).argmax(-1) == ref_y))
    thresholds = drift_scores.thresholds(card)
    parent_scores, parent_exceed = (
        drift_exceedances(parent, probe_names, x[held], thresholds, batch_size=batch_size)
        if thresholds
        else ({}, [])
    )
    domain_shift = bool(parent_exceed)
    if enough_labels and not domain_shift:
        # Labels are evidence of a domain shift too: the parent doing clearly worse on
        # the labelled traffic than on its own reference set means another domain.
        parent_traffic_acc = float(np.mean(parent_logits[labelled].argmax(-1) == y[labelled]))
        domain_shift = parent_traffic_acc < parent_ref_acc - LABELLED_SHIFT_MARGIN

    # -- candidate: AdaBN over every BN layer ---------------------------------
    # Everything about the parent is measured: the same model becomes the candidate
    # (one load, and the traced forward passes above serve the candidate too).
    candidate, parent = parent, None
    layers = bn.bn_layers(candidate)
    rng = np.random.default_rng(seed)
    collect = statistics_collector(candidate, layers, x[fit], rng, batch_size)
    target = collect()
    source = [(lyr.moving_mean.numpy(), lyr.moving_variance.numpy()) for lyr in layers]
    prior_search: list[dict[str, Any]] = []
    if prior_strength == "auto":
        fit_labelled = labelled & fit if (labelled & fit).sum() >= min_labelled // 2 else labelled
        prior_strength, prior_search = _choose_prior(
            candidate,
            layers,
            target,
            source,
            (x[fit_labelled], y[fit_labelled]) if enough_labels else None,
            (ref_x, ref_y),
            parent_ref_acc - accuracy_tolerance,
            batch_size,
            drifts=(
                (
                    lambda w: bool(
                        drift_exceedances(
                            candidate,
                            probe_names,
                            x[held],
                            residual_limits(thresholds, parent_scores, w),
                        )[1]
                    )
                )
                if thresholds
                else None
            ),
        )
    prior_strength = float(prior_strength)  # type: ignore[arg-type]
    bn.assign_statistics(layers, target, source, prior_strength=prior_strength)

    # -- candidate: fine-tuning on labelled feedback (drifted traffic only) -----
    # ``fine_tune_fraction`` of the labelled fit samples (by request id; all by
    # default: the weights gain more from labels than one temperature does). The
    # temperature is fitted, and every check on labelled traffic judged, on labelled
    # samples fine-tuning never saw.
    tuned = labelled & fit & (unit < holdout_fraction + (1 - holdout_fraction) * fine_tune_fraction)
    fine_tune: dict[str, Any] = {"ran": False}
    if fine_tune_epochs and domain_shift and tuned.sum() >= min_fine_tune_labels:
        fine_tune = {
            "ran": True,
            **fine_tune_on_feedback(
                candidate,
                x[tuned],
                y[tuned],
                (ref_x, ref_y),
                epochs=fine_tune_epochs,
                learning_rate=fine_tune_learning_rate,
                reestimate=lambda: bn.assign_statistics(
                    layers, collect(), source, prior_strength=prior_strength
                ),
                seed=seed,
            ),
        }
    else:
        fine_tune["why_not"] = (
            "disabled (fine_tune_epochs=0)"
            if not fine_tune_epochs
            else "the traffic has not drifted from the parent's domain"
            if not domain_shift
            else f"{int(tuned.sum())} labelled fit samples (< {min_fine_tune_labels})"
        )
        tuned[:] = False
    unseen = labelled & ~tuned  # labelled samples the candidate's weights never learned from
    cand_logits = _logits(candidate, x, batch_size)
    cand_ref_acc = float(np.mean(_logits(candidate, ref_x, batch_size).argmax(-1) == ref_y))

    # -- temperature ----------------------------------------------------------
    parent_t = float(card["calibration"].get("temperature", 1.0))
    t_fit: TemperatureFit | None = None
    calibration: dict[str, Any]
    if enough_labels:
        fit_l = unseen & fit if (unseen & fit).sum() >= min_labelled // 2 else unseen
        eval_l = labelled & held & ~fit_l if (labelled & held & ~fit_l).sum() >= 10 else fit_l
        temperature, calibration, t_fit = fit_served_temperature(
            (cand_logits[fit_l], y[fit_l]),
            (cand_logits[eval_l], y[eval_l]),
            parent_logits[eval_l],
            parent_t,
            in_sample=bool(np.array_equal(eval_l, fit_l)),
        )
    else:
        temperature = parent_t
        calibration = {
            "temperature": temperature,
            "method": "inherited",
            "note": f"{n_lab} labelled samples (< {min_labelled}): the parent's temperature is kept",
        }

    # -- gate -----------------------------------------------------------------
    checks: list[GateCheck] = []
    cand_pred = cand_logits.argmax(-1)
    # Without labels the parent's predictions say what the traffic holds: the candidate's
    # cannot, since statistics fitted to one class wash that class's signal out.
    share_src = "labels" if enough_labels else "parent_predictions"
    share, top = _largest_share(y[labelled] if enough_labels else parent_logits.argmax(-1))
    cand_share, cand_top = _largest_share(cand_pred)
    checks.append(
        GateCheck(
            "class_balance",
            share <= max_class_share,
            True,
            _says(
                share <= max_class_share,
                "one class dominates the samples (statistics of one class are not a domain)",
                f"{share:.0%} of the samples' {share_src.replace('_', ' ')} are class "
                f"{class_names[top] if top is not None else '?'} (limit {max_class_share:.0%})",
            ),
            {
                "largest_share": share,
                "class": top,
                "source": share_src,
                "limit": max_class_share,
                "candidate_prediction_share": cand_share,
                "candidate_prediction_class": cand_top,
            },
        )
    )
    acc_traffic: dict[str, Any] = {}
    if enough_labels:
        p_acc = float(np.mean(parent_logits[unseen].argmax(-1) == y[unseen]))
        c_acc = float(np.mean(cand_pred[unseen] == y[unseen]))
        base_rate, _ = _largest_share(y[unseen])
        n_judged = int(unseen.sum())
        acc_traffic = {
            "parent": p_acc,
            "candidate": c_acc,
            "images": n_judged,
            "fine_tuned_on": int(tuned.sum()),
            "majority_rate": base_rate,
        }
        checks.append(
            GateCheck(
                "accuracy_traffic",
                c_acc >= p_acc - accuracy_tolerance,
                True,
                _says(
                    c_acc >= p_acc - accuracy_tolerance,
                    "worse than the parent on labelled traffic",
                    f"accuracy on {n_judged} labelled traffic images {c_acc:.3f} vs parent "
                    f"{p_acc:.3f} (tolerance {accuracy_tolerance})"
                    + (f"; {int(tuned.sum())} more were fine-tuned on" if tuned.any() else ""),
                ),
                {**acc_traffic, "tolerance": accuracy_tolerance},
            )
        )
        checks.append(
            GateCheck(
                "above_chance",
                c_acc - base_rate >= min_accuracy_lift,
                True,
                _says(
                    c_acc - base_rate >= min_accuracy_lift,
                    "no better than guessing the majority class",
                    f"accuracy on labelled traffic {c_acc:.3f} vs majority-class rate {base_rate:.3f} "
                    f"(lift needed {min_accuracy_lift})",
                ),
                {"candidate": c_acc, "majority_rate": base_rate, "min_lift": min_accuracy_lift},
            )
        )
    else:
        checks.append(
            GateCheck(
                "accuracy_traffic",
                True,
                False,
                f"not checked: {n_lab} labelled samples (< {min_labelled})",
                {"images": n_lab},
            )
        )
    ref_gates = not (domain_shift and enough_labels)
    checks.append(
        GateCheck(
            "accuracy_reference",
            cand_ref_acc >= parent_ref_acc - accuracy_tolerance,
            ref_gates,
            _says(
                cand_ref_acc >= parent_ref_acc - accuracy_tolerance,
                "worse than the parent on the version's reference set",
                f"accuracy on the reference set {cand_ref_acc:.3f} vs parent {parent_ref_acc:.3f} "
                f"(tolerance {accuracy_tolerance})",
            )
            + (
                ""
                if ref_gates
                else "; informational: the traffic has drifted from the reference "
                "domain and labelled traffic decides"
            )
            + ("; in-sample: the reference set was fine-tuned on" if fine_tune["ran"] else "")
            + (
                "; labelled feedback on the traffic would let the gate judge the traffic's domain"
                if domain_shift and not enough_labels
                else ""
            ),
            {
                "parent": parent_ref_acc,
                "candidate": cand_ref_acc,
                "images": int(len(ref_y)),
                "tolerance": accuracy_tolerance,
                "traffic_drifted": domain_shift,
                "fine_tuned_on": bool(fine_tune["ran"]),
            },
        )
    )
    p_threshold = (
        parity_threshold
        if parity_threshold is not None
        else float(card.get("metrics", {}).get("parity", {}).get("threshold", 0.02))
    )
    px, py, pon = (
        (x[labelled], y[labelled], "labelled_traffic")
        if enough_labels
        else (ref_x, ref_y, "reference_set")
    )
    # Training mode normalises by batch statistics: batches must be mixed, not in capture order.
    mix = rng.permutation(len(py))
    px, py = px[mix], py[mix]
    parity = bn.classification_parity(
        candidate, px, py, threshold=p_threshold, batch_size=batch_size
    )
    checks.append(
        GateCheck(
            "parity",
            parity.passed,
            True,
            _says(
                parity.passed,
                parity.failure,
                f"inference-mode accuracy {parity.inference_metric:.3f} vs training-mode "
                f"{parity.training_metric:.3f} on the {pon.replace('_', ' ')} "
                f"(gap {parity.gap:.3f}, limit {p_threshold})",
            ),
            {**parity.to_dict(), "evaluated_on": pon},
        )
    )
    checks.append(
        drift_check(
            candidate,
            probe_names,
            x[held],
            thresholds,
            parent_scores,
            parent_exceed,
            source_weight=prior_strength / (prior_strength + target[0].images) if target else 0.0,
            held_out=bool(holdout.any()),
            batch_size=batch_size,
        )
    )

    # -- export into a private directory, then publish or reject ---------------
    fit_idx = np.flatnonzero(fit)
    samples_info = samples_summary(samples_dir, data, fit, holdout, n_lab, invalid_labels)
    accuracy = {
        "reference_set": {"parent": parent_ref_acc, "candidate": cand_ref_acc},
        "traffic": acc_traffic,
    }
    lineage = {
        "parent_version": int(parent_version),
        "method": "adabn-precise-bn" + ("+feedback-fine-tune" if fine_tune["ran"] else ""),
        "bn_layers_reestimated": len(layers),
        "fine_tune": fine_tune,
        "prior_strength": float(prior_strength),
        "prior_search": prior_search,
        "samples": samples_info,
        "temperature": temperature,
        "traffic_drifted_from_parent": domain_shift,
        "gate": {"passed": None, "checks": [c.to_dict() for c in checks]},
    }
    card_fields = {k: v for k, v in card.items() if k not in _EXPORT_OWNED}
    card_fields.update(
        {
            "metrics": {
                "accuracy": acc_traffic["candidate"] if acc_traffic else cand_ref_acc,
                "accuracy_on": "labelled_traffic" if acc_traffic else "reference_set",
                "reference_set_accuracy": cand_ref_acc,
                "parity": {**parity.to_dict(), "evaluated_on": pon},
                "evaluated_in": "inference_mode",
            },
            "bn_reference": {"pixel_stats": pixel_statistics(x[fit_idx])},
            "calibration": calibration,
            "lineage": lineage,
        }
    )
    passed, version, path, moved = export_and_publish(
        repo,
        name,
        candidate,
        card=card,
        task="classification",
        spec=spec,
        labels=class_names,
        postprocess=classifier_postprocess(temperature),
        probe_names=probe_names,
        card_fields=card_fields,
        x=x,
        fit=fit,
        held=held,
        extra_files={REFERENCE_SET: ref_bytes},
        checks=checks,
        promote=promote,
        parent_version=parent_version,
    )
    return CalibrationResult(
        prior_strength=prior_strength,
        prior_search=prior_search,
        name=name,
        status="published" if passed else "rejected",
        version=version,
        path=path,
        parent_version=int(parent_version),
        labels_moved=moved,
        checks=checks,
        temperature=temperature,
        temperature_fit=t_fit,
        accuracy=accuracy,
        samples=samples_info,
    )


# -- command line ---------------------------------------------------------------


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m training calibrate``."""
    parser.add_argument(
        "--model-base", default="models", help="model repository (default ./models)"
    )
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--samples", required=True, help="capture store root (holds <name>/)")
    parser.add_argument(
        "--prior-strength",
        type=_prior_arg,
        default="auto",
        help="source statistics as N pseudo-images (0: the samples alone); 'auto' (default) "
        "picks the best on labelled feedback that keeps the reference set within tolerance",
    )
    parser.add_argument("--min-samples", type=int, default=64, help="fewest images to calibrate on")
    parser.add_argument(
        "--min-labelled",
        type=int,
        default=32,
        help="fewest labelled images to fit a temperature and judge on traffic",
    )
    parser.add_argument("--max-samples", type=int, default=2048, help="newest images used at most")
    parser.add_argument(
        "--accuracy-tolerance",
        type=float,
        default=0.02,
        help="largest accuracy drop the gate accepts (0..1)",
    )
    parser.add_argument(
        "--max-class-share",
        type=float,
        default=0.75,
        help="largest share of one class in the samples",
    )
    parser.add_argument(
        "--promote",
        choices=PROMOTE_LABELS,
        default="canary",
        help="label to point at a published candidate (default canary)",
    )
    parser.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=4,
        help="epochs of fine-tuning on labelled feedback from drifted traffic (0: off)",
    )
    parser.add_argument("--fine-tune-learning-rate", type=float, default=3e-4)
    parser.add_argument(
        "--min-fine-tune-labels",
        type=int,
        default=96,
        help="fewest labelled fit samples to fine-tune on",
    )
    parser.add_argument("--seed", type=int, default=0)


def _prior_arg(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        strength = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 or 'auto', got {value!r}"
        ) from None
    if strength < 0:
        raise argparse.ArgumentTypeError("the prior strength must be >= 0")
    return strength


def run_calibrate(args: argparse.Namespace) -> int:
    """Run a calibration; exit 0 published, 3 rejected by the gate, 4 too few samples, 5 error."""
    try:
        result = calibrate(
            args.model_base,
            args.name,
            args.samples,
            prior_strength=args.prior_strength,
            min_samples=args.min_samples,
            min_labelled=args.min_labelled,
            max_samples=args.max_samples,
            accuracy_tolerance=args.accuracy_tolerance,
            max_class_share=args.max_class_share,
            promote=args.promote,
            seed=args.seed,
            fine_tune_epochs=args.fine_tune_epochs,
            fine_tune_learning_rate=args.fine_tune_learning_rate,
            min_fine_tune_labels=args.min_fine_tune_labels,
        )
    except NotEnoughSamplesError as exc:
        print(f"not enough samples: {exc}", file=sys.stderr)
        return EXIT_NOT_ENOUGH_SAMPLES
    except (CalibrationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(result.to_dict(), indent=1, default=float))
    if result.passed:
        print(
            f"published {result.name} version {result.version} ({result.labels_moved})",
            file=sys.stderr,
        )
        return EXIT_PUBLISHED
    print(f"rejected: candidate kept at {result.path}", file=sys.stderr)
    for reason in result.reasons:
        print(f"  - {reason}", file=sys.stderr)
    return EXIT_REJECTED


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m training promote``."""
    parser.add_argument(
        "--model-base", default="models", help="model repository (default ./models)"
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", type=int, required=True, help="published version to label")
    parser.add_argument("--label", default="stable", help="version label to move (default stable)")


def run_promote(args: argparse.Namespace) -> int:
    """Move a label; exit 0, or 5 when the version or label cannot be used."""
    try:
        previous = promote(args.model_base, args.name, args.version, args.label)
    except (LabelError, RepositoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(
        json.dumps(
            {"name": args.name, "label": args.label, "version": args.version, "previous": previous}
        )
    )
    return 0


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m training rollback``."""
    parser.add_argument(
        "--model-base", default="models", help="model repository (default ./models)"
    )
    parser.add_argument("--name", required=True)
    parser.add_argument(
        "--label", default="stable", help="version label to move back (default stable)"
    )


def run_rollback(args: argparse.Namespace) -> int:
    """Move a label back to its previous version; exit 0, or 5 when there is none."""
    try:
        current, target = rollback(args.model_base, args.name, args.label)
    except (LabelError, RepositoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps({"name": args.name, "label": args.label, "from": current, "to": target}))
    return 0
