"""Fine-tuning a detector's weights on box feedback from captured traffic.

Re-estimated statistics alone cannot undo what a shift destroys (noise, blur);
boxes drawn on the traffic can teach the weights to read it. The boxes arrive
in model-input pixels (:class:`calibration.samples.BoxLabel`) and become
training targets exactly as in training: normalised, then assigned to anchors
by :func:`training.detection.matching.match_anchors`, and learned with
training's loss and train step (:func:`training.detection.train.make_train_step`).

The split that judges the candidate is the traffic's own
(:func:`calibration.traffic.split_samples`, by request id): box-labelled
samples of the fit part are trained on, those of the held-out part are never
seen (neither by the statistics nor by the weights) and score parent and
candidate with pycocotools.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from calibration.config import CalibrationConfig
from calibration.reestimate import Reestimation
from calibration.traffic import MIN_SPLIT_SIDE, TrafficSplit
from contract import bn
from contract.json_sections import thaw
from contract.model_card import ModelCard
from training.detection.anchors import AnchorConfig, generate_anchors
from training.detection.boxes import DEFAULT_VARIANCES
from training.detection.data import DetectionDataset, DetectionSample
from training.detection.evaluate import DetectionMetrics, predict
from training.detection.losses import LossConfig
from training.detection.matching import MatchConfig, match_anchors
from training.detection.reference import ReferenceSet, score_outputs
from training.detection.train import make_train_step

#: Gradient clipping of the fine-tuning optimizer (training's value).
CLIP_NORM = 10.0


@dataclass(frozen=True)
class BoxFeedback:
    """The box-labelled samples as a scorable dataset, and which of them train or judge.

    ``dataset`` holds one sample per box-labelled image (in the order of
    ``index``, positions in the sample set), boxes in model-input pixels.
    ``fit`` and ``held`` are masks over ``index``.
    """

    index: np.ndarray
    dataset: DetectionDataset
    fit: np.ndarray
    held: np.ndarray
    unknown_labels: int

    def __len__(self) -> int:
        return len(self.index)

    def part(self, mask: np.ndarray) -> tuple[np.ndarray, DetectionDataset]:
        """Sample-set positions and the dataset of the box-labelled samples in ``mask``."""
        return self.index[mask], self.dataset.subset(np.flatnonzero(mask).tolist())


def collect_box_feedback(
    objects: Sequence[Sequence[Any] | None],
    labels: list[str],
    shape: tuple[int, int],
    split: TrafficSplit,
) -> BoxFeedback:
    """The box-labelled samples among ``objects`` (None: no box feedback for that image).

    Each object has ``label`` (a class name) and ``box`` (ymin, xmin, ymax,
    xmax in model-input pixels). Objects of a class the model does not have are
    left out and counted (the store validates labels; a model may have changed).
    """
    h, w = shape
    index, samples, unknown = [], [], 0
    for i, objs in enumerate(objects):
        if objs is None:
            continue
        known = [o for o in objs if o.label in labels]
        unknown += len(objs) - len(known)
        boxes = np.array([o.box for o in known], np.float32).reshape(-1, 4)
        samples.append(
            DetectionSample(
                image_id=len(samples) + 1,
                path=Path(f"traffic/{i}"),
                height=h,
                width=w,
                boxes=boxes,
                classes=np.array([labels.index(o.label) for o in known], np.int64),
                crowd=np.zeros(len(known), bool),
            )
        )
        index.append(i)
    idx = np.array(index, np.int64)
    dataset = DetectionDataset(list(labels), list(range(1, len(labels) + 1)), samples)
    return BoxFeedback(idx, dataset, split.fit[idx], split.holdout[idx], unknown)


def why_not_fine_tuned(config: CalibrationConfig, boxes: BoxFeedback) -> str | None:
    """Why the detector is not fine-tuned on box feedback, or None when it is."""
    if not config.fine_tune("detection")[0]:
        return "disabled (fine_tune_epochs=0)"
    if not len(boxes):
        return "no box feedback"
    if len(boxes) < config.min_fine_tune_labels:
        return f"{len(boxes)} box-labelled samples (< {config.min_fine_tune_labels})"
    if boxes.held.sum() < MIN_SPLIT_SIDE or boxes.fit.sum() < MIN_SPLIT_SIDE:
        return (
            f"{int(boxes.fit.sum())} box-labelled fit and {int(boxes.held.sum())} held-out "
            f"samples (need {MIN_SPLIT_SIDE} on each side to train and to judge)"
        )
    return None


def anchor_targets(
    dataset: DetectionDataset,
    anchors: np.ndarray,
    match: MatchConfig,
    variances: Sequence[float] = DEFAULT_VARIANCES,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-anchor training targets of a dataset whose boxes are in model-input pixels.

    Returns labels ``[n, A]`` (-1 ignore, 0 background, k + 1) and box codes
    ``[n, A, 4]``. Boxes are normalised by the image size and clipped to it;
    crowd regions and boxes clipped to nothing are not learned from (as in
    training's :func:`training.detection.pipeline.encode_example`).
    """
    labels = np.zeros((len(dataset), len(anchors)), np.int32)
    targets = np.zeros((len(dataset), len(anchors), 4), np.float32)
    for i, s in enumerate(dataset.samples):
        scale = np.array([s.height, s.width, s.height, s.width], np.float32)
        norm = np.clip(np.asarray(s.boxes, np.float32).reshape(-1, 4) / scale, 0.0, 1.0)
        keep = (
            ~np.asarray(s.crowd, bool)
            & (norm[:, 2] - norm[:, 0] > 1e-3)
            & (norm[:, 3] - norm[:, 1] > 1e-3)
        )
        result = match_anchors(anchors, norm[keep], s.classes[keep], match, variances)
        labels[i], targets[i] = result.labels, result.box_targets
    return labels, targets


def fine_tune_detector(
    model: keras.Model,
    x: np.ndarray,
    targets: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    learning_rate: float,
    reestimate: Callable[[], None],
    weight_mix: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    loss: LossConfig | None = None,
) -> dict[str, Any]:
    """Fine-tune on images ``x`` with anchor ``targets`` (labels, box codes) from :func:`anchor_targets`.

    As the classifier's :func:`calibration.fine_tune.fine_tune_on_feedback`: BN
    layers frozen (statistics and affine), so they run in inference mode under
    the statistics re-estimated on the traffic, which the exported graph
    applies; after every epoch ``reestimate()`` collects the statistics again
    for the changed weights (called with the BN layers frozen, leaving them so).
    The other layers train as the parent left them. Training's focal + smooth
    L1 loss and train step, Adam with training's gradient clipping and the
    learning rate decayed to 0 over the run on a cosine, shuffled mini-batches.

    Then the weights keep ``weight_mix`` of their change: parent + mix x
    (fine-tuned - parent), weight-space ensembling (WiSE-FT, Wortsman et al.,
    CVPR 2022). A few hundred images move every weight, and the part of the
    move that fits those images rather than the shift costs the source domain;
    the mix gives most of that back for a smaller part of what the traffic
    gained (docs/calibration.md has the trade-off). ``reestimate()`` runs once
    more on the mixed weights. Returns what the lineage records.
    """
    if not 0.0 < weight_mix <= 1.0:
        raise ValueError(f"weight_mix must be in (0, 1], got {weight_mix}")
    layers = bn.bn_layers(model)
    flags = [layer.trainable for layer in layers]
    y_labels, y_boxes = targets
    try:
        for layer in layers:
            layer.trainable = False
        parent = [v.numpy() for v in model.trainable_variables]
        steps = max(1, round(len(x) / batch_size))
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, epochs * steps))
        optimizer = keras.optimizers.Adam(schedule, global_clipnorm=CLIP_NORM)
        step = make_train_step(model, optimizer, loss or LossConfig())
        rng = np.random.default_rng(seed)
        losses = []
        started = time.monotonic()
        for epoch in range(epochs):
            order = rng.permutation(len(x))
            rows = [
                step(tf.constant(x[idx]), tf.constant(y_labels[idx]), tf.constant(y_boxes[idx]))
                for idx in np.array_split(order, steps)
            ]
            mean = float(np.mean([float(r["loss"]) for r in rows]))
            if not np.isfinite(mean):
                raise FloatingPointError(f"fine-tuning diverged at epoch {epoch + 1}")
            losses.append(mean)
            reestimate()
        if weight_mix < 1.0:
            tuned = [v.numpy() for v in model.trainable_variables]
            mix_weights(model.trainable_variables, parent, tuned, weight_mix)
            reestimate()
        trainable = len(model.trainable_variables)
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.trainable = flag
    return {
        "method": "supervised on box feedback, BN frozen in inference mode",
        "loss": "focal + smooth L1 (training's)",
        "epochs": epochs,
        "learning_rate": learning_rate,
        "learning_rate_schedule": "cosine decay to 0",
        "weight_mix": weight_mix,
        "images": int(len(x)),
        "positive_anchors": int((y_labels > 0).sum()),
        "trainable_variables": trainable,
        "loss_by_epoch": losses,
        "seconds": round(time.monotonic() - started, 1),
    }


def mix_weights(
    variables: Sequence[tf.Variable],
    parent: Sequence[np.ndarray],
    tuned: Sequence[np.ndarray],
    mix: float,
) -> None:
    """Assign parent + ``mix`` x (tuned - parent) to ``variables`` (WiSE-FT's interpolation)."""
    for var, start, end in zip(variables, parent, tuned, strict=True):
        var.assign(start + mix * (end - start))


def score_boxes(
    model: keras.Model,
    postprocess: Callable,
    x: np.ndarray,
    boxes: BoxFeedback,
    mask: np.ndarray,
    batch_size: int,
) -> DetectionMetrics:
    """COCO metrics of ``model`` (inference mode) against the box feedback of ``mask``."""
    index, dataset = boxes.part(mask)
    return score_outputs(predict(model, postprocess, x[index], batch_size=batch_size), dataset)


def box_coding(card: ModelCard) -> tuple[np.ndarray, MatchConfig, list[float]]:
    """Training's anchors, anchor matching and box variances, from a detector's card."""
    det, spec = card.detection, card.preprocess_spec
    anchors = generate_anchors(AnchorConfig.from_dict(thaw(det.anchors)), spec.height, spec.width)
    matching = thaw(det.extra.get("matching", {}))  # training's MatchConfig; defaults if absent
    match = MatchConfig(
        **{k: matching[k] for k in MatchConfig.__dataclass_fields__ if k in matching}
    )
    return anchors, match, thaw(det.box_variances)


def fine_tune_on_boxes(
    model: keras.Model,
    stats: Reestimation,
    prior_strength: float,
    x: np.ndarray,
    boxes: BoxFeedback,
    reference: ReferenceSet,
    card: ModelCard,
    config: CalibrationConfig,
) -> dict[str, Any]:
    """Fine-tune on the box-labelled fit samples plus the reference set; the lineage's entry.

    Targets come from the card's anchors, matching and box coding (those of
    training). After every epoch the statistics are collected again and mixed
    with ``prior_strength`` of the source, as the candidate was before.
    """
    anchors, match, variances = box_coding(card)
    index, fit_set = boxes.part(boxes.fit)
    feedback = anchor_targets(fit_set, anchors, match, variances)
    ref_targets = anchor_targets(reference.dataset, anchors, match, variances)
    xs = np.concatenate([x[index], reference.x]).astype(np.float32)
    targets = (
        np.concatenate([feedback[0], ref_targets[0]]),
        np.concatenate([feedback[1], ref_targets[1]]),
    )
    epochs, learning_rate = config.fine_tune("detection")
    run = fine_tune_detector(
        model,
        xs,
        targets,
        epochs=epochs,
        learning_rate=learning_rate,
        reestimate=lambda: stats.collect_again(prior_strength),
        weight_mix=config.fine_tune_weight_mix,
        seed=config.seed,
    )
    return {
        "ran": True,
        **run,
        "feedback_images": int(len(index)),
        "feedback_boxes": fit_set.num_boxes(),
        "reference_images": len(reference),
        "matching": match.to_dict(),
    }
