"""Calibration of a detector: AdaBN on captured traffic, gated on mAP and parity.

:func:`calibration.classifier.calibrate` hands detection models here. The path
is the classifier's (same sample split, precise-BN routine, prior, drift and
staleness checks, private export, publish or reject, label moves), with what
differs for boxes:

- feedback is image labels, not boxes, so nothing is fine-tuned and no
  temperature is fitted (the parent's is kept; a detector's scores are
  per-class sigmoids the exported graph does not rescale);
- ``map_reference`` gates on the version's shipped reference set
  (:mod:`training.detection.reference`): the candidate's COCO mAP@[.5:.95]
  may not fall more than ``accuracy_tolerance`` below the parent's. There is
  no labelled traffic to decide instead, so it always gates;
- ``prior_strength="auto"`` tries the source weights of
  :data:`calibration.classifier.AUTO_SOURCE_WEIGHTS` and keeps the most adapted
  one within the mAP tolerance that leaves the held-out traffic below the
  drift alarm;
- ``parity`` needs no labels: inference-mode detections on held-out traffic,
  under the statistics re-estimated on the traffic (before any mixing with the
  source: a mix differs from batch statistics by design), are scored (mAP@.5)
  against the training-mode detections with score >= 0.5 as ground truth
  (judged from :data:`MIN_PARITY_BOXES` of them). Statistics that do not
  describe the traffic make the two modes disagree; the gap is 1 - agreement;
- ``class_balance`` counts the classes of the parent's confident detections;
  *confident* means a score of at least :func:`confident_score`: 0.5, or the
  parent's median best score on its reference set when that is lower (a weak
  detector's scores rarely reach 0.5);
- ``detects_objects``: on the held-out traffic the candidate makes at least
  :data:`MIN_DETECTION_SHARE` of the confident detections per image the parent
  makes on its reference set. Without labels this is what tells images with
  objects from garbage: statistics of noise images mixed with enough of the
  source keep the reference mAP and clear the drift alarm, and detect nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calibration import classifier as cal
from contract import bn, drift_scores
from contract.export import pixel_statistics
from contract.model_card import load_model_card
from contract.preprocessing import PreprocessSpec
from contract.repository import ModelRepository
from training.detection.anchors import AnchorConfig, generate_anchors
from training.detection.data import DetectionDataset, DetectionSample
from training.detection.evaluate import DetectionMetrics, predict
from training.detection.postprocess import NmsConfig, make_postprocess
from training.detection.reference import (
    REFERENCE_SET,
    evaluate_reference,
    load_reference_set,
    score_outputs,
)

#: The highest score threshold that makes a detection *confident* (:func:`confident_score`).
CONFIDENT_SCORE = 0.5
#: Fewest training-mode detections with score >= CONFIDENT_SCORE that parity is judged on.
#: Parity uses 0.5 itself, not a weak detector's lower bar: detections of middling score
#: flip between the modes from batch to batch, whatever the statistics.
MIN_PARITY_BOXES = 10
#: Confident detections per held-out traffic image, as a share of the parent's per
#: reference image, below which the traffic is taken for images without objects.
MIN_DETECTION_SHARE = 0.25
#: Default largest parity gap (1 - agreement); ``parity_threshold`` overrides it.
DEFAULT_PARITY_GAP = 0.1


def postprocess_from_card(card: dict[str, Any]):
    """The exported graph's decode + NMS, rebuilt from the card's ``detection`` section."""
    det = card["detection"]
    spec = PreprocessSpec.from_dict(card["preprocessing"])
    anchors = generate_anchors(AnchorConfig.from_dict(det["anchors"]), spec.height, spec.width)
    nms_fields = {k: det["nms"][k] for k in NmsConfig.__dataclass_fields__ if k in det["nms"]}
    return make_postprocess(anchors, NmsConfig(**nms_fields), det["box_variances"])


def confident_score(reference_outputs: dict[str, np.ndarray]) -> float:
    """:data:`CONFIDENT_SCORE`, or the median best score per reference image if lower."""
    best = reference_outputs["detection_scores"][:, 0]
    return float(min(CONFIDENT_SCORE, np.median(best))) if len(best) else CONFIDENT_SCORE


def _as_ground_truth(
    outputs: dict[str, np.ndarray], shape: tuple[int, int], labels: list[str], min_score: float
) -> DetectionDataset:
    """Confident detections as a labelled set of model-input-sized images (pseudo labels)."""
    h, w = shape
    samples = []
    for i in range(len(outputs["num_detections"])):
        n = int(outputs["num_detections"][i])
        keep = outputs["detection_scores"][i, :n] >= min_score
        boxes = outputs["detection_boxes"][i, :n][keep] * np.array([h, w, h, w], np.float32)
        samples.append(
            DetectionSample(
                image_id=i + 1,
                path=Path(f"traffic/{i}"),
                height=h,
                width=w,
                boxes=boxes.astype(np.float32),
                classes=outputs["detection_classes"][i, :n][keep].astype(np.int64),
                crowd=np.zeros(int(keep.sum()), bool),
            )
        )
    return DetectionDataset(list(labels), list(range(1, len(labels) + 1)), samples)


def mode_agreement(
    model,
    postprocess,
    x: np.ndarray,
    labels: list[str],
    min_score: float,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """mAP@.5 of inference-mode detections against training-mode ones >= ``min_score``."""
    trn = predict(model, postprocess, x, training=True, batch_size=batch_size)
    inf = predict(model, postprocess, x, batch_size=batch_size)
    truth = _as_ground_truth(trn, x.shape[1:3], labels, min_score)
    boxes = truth.num_boxes()
    agreement = score_outputs(inf, truth).map_50 if boxes else None
    return {
        "agreement_map_50": agreement,
        "training_mode_boxes": boxes,
        "images": len(x),
        "confident_score": min_score,
    }


def _confident_classes(outputs: dict[str, np.ndarray], min_score: float) -> np.ndarray:
    classes = []
    for i in range(len(outputs["num_detections"])):
        n = int(outputs["num_detections"][i])
        keep = outputs["detection_scores"][i, :n] >= min_score
        classes.append(outputs["detection_classes"][i, :n][keep].astype(np.int64))
    return np.concatenate(classes) if classes else np.zeros(0, np.int64)


def _choose_prior(
    layers,
    target,
    source,
    score_reference,
    floor: float,
    drifts,
) -> tuple[float, list[dict[str, Any]]]:
    """The most adapted source weight within the mAP floor that clears the drift alarm."""
    tried = cal.try_source_weights(
        layers,
        target,
        source,
        lambda w: {
            "reference_map_50_95": score_reference().map_50_95,
            "traffic_drifts": bool(drifts(w)) if drifts is not None else False,
        },
    )
    within = [t for t in tried if t["reference_map_50_95"] >= floor]
    eligible = [t for t in within if not t["traffic_drifts"]] or within
    if eligible:
        best = min(eligible, key=lambda t: t["source_weight"])
    else:  # every weight loses mAP: the least loss, rejected by the gate below
        best = max(tried, key=lambda t: (t["reference_map_50_95"], -t["source_weight"]))
    return best["prior_strength"], tried


def calibrate_detector(
    model_base,
    name: str,
    samples_dir,
    *,
    prior_strength: float | str = "auto",
    min_samples: int = 64,
    accuracy_tolerance: float = 0.02,
    promote: str = "canary",
    max_samples: int = 2048,
    holdout_fraction: float = 0.25,
    max_class_share: float = 0.75,
    parity_threshold: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> cal.CalibrationResult:
    """Calibrate the ``stable`` version of detector ``name`` (module docstring)."""
    repo = ModelRepository(model_base)
    parent_version = int(repo.labels(name)["stable"])
    parent_dir = repo.version_dir(name, parent_version)
    card = load_model_card(parent_dir)
    spec = PreprocessSpec.from_dict(card["preprocessing"])
    labels = list(card["labels"])
    probe_names = [p["name"] for p in card["bn_reference"]["probes"]]
    ref_path = (
        parent_dir / "assets.extra" / card.get("reference_set", {}).get("file", REFERENCE_SET)
    )
    if not ref_path.exists():
        raise cal.CalibrationError(
            f"version {parent_version} of {name} ships no reference set ({ref_path}); "
            "export it again with this release to calibrate it"
        )
    ref_bytes = ref_path.read_bytes()
    ref = load_reference_set(ref_path, spec, labels)
    postprocess = postprocess_from_card(card)

    # -- samples (feedback labels are image labels: not used for boxes) -------
    data = cal.load_enough_samples(samples_dir, name, spec, max_samples, min_samples)
    x = data.inputs
    _, holdout, fit, held = cal.split_samples(data, holdout_fraction)

    # -- parent ---------------------------------------------------------------
    model = cal._load_keras(parent_dir)

    def score_reference() -> DetectionMetrics:
        return evaluate_reference(model, postprocess, ref, batch_size=batch_size)

    parent_ref_out = predict(model, postprocess, ref.x, batch_size=batch_size)
    parent_ref = score_outputs(parent_ref_out, ref.dataset)
    confident = confident_score(parent_ref_out)
    parent_rate = len(_confident_classes(parent_ref_out, confident)) / len(ref)
    parent_classes = _confident_classes(
        predict(model, postprocess, x, batch_size=batch_size), confident
    )
    thresholds = drift_scores.thresholds(card)
    parent_scores, parent_exceed = (
        cal.drift_exceedances(model, probe_names, x[held], thresholds, batch_size=batch_size)
        if thresholds
        else ({}, [])
    )

    # -- candidate: AdaBN over every BN layer ---------------------------------
    layers = bn.bn_layers(model)
    rng = np.random.default_rng(seed)
    collect = cal.statistics_collector(model, layers, x[fit], rng, batch_size)
    target = collect()
    source = [(lyr.moving_mean.numpy(), lyr.moving_variance.numpy()) for lyr in layers]
    bn.assign_statistics(layers, target, source, prior_strength=0.0)
    mix = rng.permutation(int(held.sum()))  # batch statistics need mixed batches
    agreement = mode_agreement(
        model, postprocess, x[held][mix], labels, CONFIDENT_SCORE, batch_size=batch_size
    )
    floor = parent_ref.map_50_95 - accuracy_tolerance
    prior_search: list[dict[str, Any]] = []
    if prior_strength == "auto":
        prior_strength, prior_search = _choose_prior(
            layers,
            target,
            source,
            score_reference,
            floor,
            (
                lambda w: bool(
                    cal.drift_exceedances(
                        model,
                        probe_names,
                        x[held],
                        cal.residual_limits(thresholds, parent_scores, w),
                        batch_size=batch_size,
                    )[1]
                )
            )
            if thresholds
            else None,
        )
    prior_strength = float(prior_strength)  # type: ignore[arg-type]
    bn.assign_statistics(layers, target, source, prior_strength=prior_strength)
    cand_ref = score_reference()

    # -- gate -----------------------------------------------------------------
    checks: list[cal.GateCheck] = []
    share, top = cal._largest_share(parent_classes)
    counted = len(parent_classes) > 0
    checks.append(
        cal.GateCheck(
            "class_balance",
            share <= max_class_share,
            counted,
            cal._says(
                share <= max_class_share,
                "one class dominates the samples (statistics of one class are not a domain)",
                f"{share:.0%} of the parent's {len(parent_classes)} detections with score >= "
                f"{confident:.2f} are {labels[top] if top is not None else '?'} "
                f"(limit {max_class_share:.0%})",
            )
            if counted
            else f"not checked: the parent detects nothing with score >= {confident:.2f}",
            {
                "largest_share": share,
                "class": top,
                "source": "parent_detections",
                "confident_score": confident,
                "detections": int(len(parent_classes)),
                "limit": max_class_share,
            },
        )
    )
    ok = cand_ref.map_50_95 >= floor
    checks.append(
        cal.GateCheck(
            "map_reference",
            ok,
            True,
            cal._says(
                ok,
                "worse than the parent on the version's reference set",
                f"mAP@[.5:.95] on {len(ref)} reference images {cand_ref.map_50_95:.3f} vs parent "
                f"{parent_ref.map_50_95:.3f} (tolerance {accuracy_tolerance}); mAP@.5 "
                f"{cand_ref.map_50:.3f} vs {parent_ref.map_50:.3f}",
            ),
            {
                "parent": parent_ref.to_dict(),
                "candidate": cand_ref.to_dict(),
                "images": len(ref),
                "boxes": ref.dataset.num_boxes(),
                "tolerance": accuracy_tolerance,
                "traffic_drifted": bool(parent_exceed),
            },
        )
    )
    cand_rate = len(
        _confident_classes(predict(model, postprocess, x[held], batch_size=batch_size), confident)
    ) / int(held.sum())
    ok = cand_rate >= MIN_DETECTION_SHARE * parent_rate
    checks.append(
        cal.GateCheck(
            "detects_objects",
            ok,
            True,
            cal._says(
                ok,
                "the candidate finds (almost) no objects in the traffic",
                f"{cand_rate:.2f} detections with score >= {confident:.2f} per held-out image vs "
                f"the parent's {parent_rate:.2f} per reference image "
                f"(at least {MIN_DETECTION_SHARE:.0%} of it)",
            ),
            {
                "candidate_per_image": cand_rate,
                "parent_reference_per_image": parent_rate,
                "min_share": MIN_DETECTION_SHARE,
                "confident_score": confident,
                "images": int(held.sum()),
            },
        )
    )
    p_threshold = parity_threshold if parity_threshold is not None else DEFAULT_PARITY_GAP
    checkable = agreement["training_mode_boxes"] >= MIN_PARITY_BOXES
    gap = 1.0 - agreement["agreement_map_50"] if checkable else None
    parity = {
        **agreement,
        "gap": gap,
        "threshold": p_threshold,
        "passed": bool(checkable and gap <= p_threshold),
    }
    checks.append(
        cal.GateCheck(
            "parity",
            parity["passed"] if checkable else True,
            checkable,
            cal._says(
                parity["passed"],
                "inference mode disagrees with training mode on the traffic",
                f"inference-mode detections match {agreement['training_mode_boxes']} confident "
                f"training-mode ones at mAP@.5 {agreement['agreement_map_50']:.3f} on "
                f"{agreement['images']} held-out images under the statistics re-estimated on "
                f"the traffic (gap {gap:.3f}, limit {p_threshold})",
            )
            if checkable and gap is not None
            else f"not checked: {agreement['training_mode_boxes']} training-mode detections "
            f"with score >= {CONFIDENT_SCORE} (fewer than {MIN_PARITY_BOXES})",
            parity,
        )
    )
    checks.append(
        cal.drift_check(
            model,
            probe_names,
            x[held],
            thresholds,
            parent_scores,
            parent_exceed,
            source_weight=prior_strength / (prior_strength + target[0].images),
            held_out=bool(holdout.any()),
            batch_size=batch_size,
        )
    )

    # -- export, publish or reject --------------------------------------------
    n_lab = int(data.labelled.sum())
    samples_info = cal.samples_summary(samples_dir, data, fit, holdout, n_lab, 0)
    temperature = float(card["calibration"].get("temperature", 1.0))
    lineage = {
        "parent_version": parent_version,
        "method": "adabn-precise-bn",
        "bn_layers_reestimated": len(layers),
        "fine_tune": {"ran": False, "why_not": "detector feedback has no boxes"},
        "prior_strength": prior_strength,
        "prior_search": prior_search,
        "samples": samples_info,
        "temperature": temperature,
        "traffic_drifted_from_parent": bool(parent_exceed),
        "gate": {"passed": None, "checks": [c.to_dict() for c in checks]},
    }
    card_fields = {k: v for k, v in card.items() if k not in cal._EXPORT_OWNED}
    card_fields.update(
        {
            "metrics": {
                **cand_ref.to_dict(),
                "evaluated_on": "reference_set",
                "evaluator": "pycocotools COCOeval bbox, model-input pixels",
                "parent_reference_set": parent_ref.to_dict(),
                "parity": parity,
                "parity_metric": "agreement of inference with training mode, mAP@.5",
                "evaluated_in": "inference_mode",
            },
            "bn_reference": {"pixel_stats": pixel_statistics(x[fit])},
            "calibration": {
                "temperature": temperature,
                "method": "inherited",
                "note": "detectors: no temperature is fitted (feedback carries no boxes)",
            },
            "lineage": lineage,
        }
    )
    passed, version, path, moved = cal.export_and_publish(
        repo,
        name,
        model,
        card=card,
        task="detection",
        spec=spec,
        labels=labels,
        postprocess=postprocess,
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
    return cal.CalibrationResult(
        name=name,
        status="published" if passed else "rejected",
        version=version,
        path=path,
        parent_version=parent_version,
        labels_moved=moved,
        checks=checks,
        temperature=temperature,
        temperature_fit=None,
        accuracy={
            "reference_set": {"parent": parent_ref.to_dict(), "candidate": cand_ref.to_dict()},
            "metric": "map_50_95",
        },
        samples=samples_info,
        prior_strength=prior_strength,
        prior_search=prior_search,
    )
