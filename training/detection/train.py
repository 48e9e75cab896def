"""Train, evaluate and export the MobileNetV2 SSDLite detector.

The run, in order:

1. data: a COCO-format dataset (``--data annotations.json --images DIR``, with
   ``--val-data`` or seeded held-out fractions), or the built-in synthetic set
   written in COCO format and read back by the same loader, in three splits
   (:mod:`training.detection.splits`): train, validation, test;
2. model: :func:`training.detection.model.build_detector`, anchors from the
   same :class:`AnchorConfig`;
3. BN momentum set for the run length (:func:`contract.bn.momentum_for_steps`);
4. training: augmented batches (:mod:`training.detection.pipeline`), focal +
   smooth L1 loss, AdamW with warm-up and cosine decay; validation mAP@.5 every
   few epochs stops training early and chooses the kept weights;
5. precise BN over un-augmented training images, then COCO evaluation on the
   test split in inference mode and the paired parity gate (per-image top
   detection in inference vs training mode, :func:`detection_parity`); a failed
   check stops the export unless forced;
6. export (:func:`contract.export.export_model`) with the decode + NMS in the
   graph and the model card's ``detection`` and ``metrics`` sections.

:func:`train_detector` is the library; :mod:`training.detection.config` holds the
parameters and presets, :mod:`training.detection.cli` the command line
(``python -m training detector ...``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contract import bn, drift_scores
from contract.export import ExportRefused, ExportResult, export_model, pixel_statistics
from training.classifier import ParityError, WarmupSchedule
from training.detection.anchors import feature_map_sizes, generate_anchors
from training.detection.boxes import DEFAULT_VARIANCES
from training.detection.config import DetectorTrainConfig
from training.detection.data import DetectionDataset, DetectionImage
from training.detection.evaluate import (
    PAIRED_ON,
    DetectionMetrics,
    detection_parity,
    evaluate_detector,
    inference_function,
    preprocess_images,
)
from training.detection.losses import LossConfig, detection_loss
from training.detection.model import BACKBONE_LAYERS, DetectorConfig, build_detector
from training.detection.pipeline import TrainingBatches, image_batches
from training.detection.postprocess import make_postprocess
from training.detection.reference import REFERENCE_SET, reference_set_bytes
from training.detection.reference import describe as describe_reference_set
from training.detection.splits import SPLIT_OF, load_datasets

__all__ = ["DetectorTrainConfig", "ParityError", "load_datasets", "train_detector"]


# --- training ---------------------------------------------------------------


def make_train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss: LossConfig):
    """One compiled optimisation step: ``(x, labels, box_targets) -> loss dict``.

    The optimizer's slot variables are created here, before the first call: a
    ``tf.function`` that creates variables when first called is traced twice, which
    doubled the time to the first step (50 s against 25 s for the tiny preset).
    """
    optimizer.build(model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            class_logits, box_deltas = model(x, training=True)
            losses = detection_loss(labels, targets, class_logits, box_deltas, loss)
        grads = tape.gradient(losses["loss"], model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return losses

    return step


def fit(
    model: keras.Model,
    batches: TrainingBatches,
    *,
    epochs: int,
    learning_rate: float,
    warmup_epochs: float,
    weight_decay: float,
    loss: LossConfig | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int], dict[str, float]] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on ``batches`` for ``epochs``; returns per-epoch mean losses.

    ``on_epoch_end(epoch)`` may return extra numbers for the epoch's row (e.g. a
    validation mAP); they are logged and kept in the history. Training ends early
    when ``stop()`` says so after an epoch.
    """
    steps = batches.steps_per_epoch
    if steps < 1:
        raise ValueError("fewer training images than one batch")
    total = steps * epochs
    schedule = WarmupSchedule(learning_rate, int(warmup_epochs * steps), total, "cosine")
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay, global_clipnorm=10.0)
    step = make_train_step(model, optimizer, loss or LossConfig())
    history: list[dict[str, float]] = []
    it = iter(batches.tf_dataset(epochs))
    for epoch in range(epochs):
        started = time.monotonic()
        sums = {"loss": 0.0, "class_loss": 0.0, "box_loss": 0.0}
        for _ in range(steps):
            x, labels, targets = next(it)
            out = step(x, labels, targets)
            for k in sums:
                sums[k] += float(out[k])
        row = {k: v / steps for k, v in sums.items()}
        row["seconds"] = time.monotonic() - started
        if not all(math.isfinite(v) for v in row.values()):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: {row}")
        extra = on_epoch_end(epoch + 1) if on_epoch_end else {}
        row.update(extra)
        history.append(row)
        if log:
            log(
                f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} (class {row['class_loss']:.4f}, "
                f"box {row['box_loss']:.4f}), lr {float(schedule(optimizer.iterations)):.2e}, "
                f"{row['seconds']:.1f} s" + "".join(f", {k} {v:.4f}" for k, v in extra.items())
            )
        if stop is not None and stop():
            break
    return history


class EarlyStopping:
    """Validation mAP@.5 every ``eval_every`` epochs (and after the last); stops after
    ``patience`` checks without a better one and :meth:`restore` puts back the best
    checked weights (``patience`` 0: never stops, keeps the last weights)."""

    def __init__(
        self,
        model: keras.Model,
        evaluate: Callable[[], float],
        *,
        eval_every: int,
        patience: int,
        epochs: int,
    ):
        self.model, self.evaluate = model, evaluate
        self.eval_every, self.patience, self.epochs = eval_every, patience, epochs
        self.best, self.best_epoch, self.waits, self.weights = -1.0, 0, 0, None

    def __call__(self, epoch: int) -> dict[str, float]:
        last = epoch == self.epochs
        if not self.eval_every or (epoch % self.eval_every and not (last and self.patience)):
            return {}
        value = float(self.evaluate())
        if value > self.best:
            self.best, self.best_epoch, self.waits = value, epoch, 0
            if self.patience:
                self.weights = self.model.get_weights()
        else:
            self.waits += 1
        return {"val_map_50": value}

    def should_stop(self) -> bool:
        return bool(self.patience) and self.waits >= self.patience

    def restore(self) -> int | None:
        """Put back the best checked weights; returns their epoch (None: none kept)."""
        if self.weights is None:
            return None
        self.model.set_weights(self.weights)
        return self.best_epoch


def inference_timing(
    model: keras.Model, postprocess, x: np.ndarray, *, repeats: int = 20, batch_size: int = 32
) -> dict[str, float]:
    """In-process latency of network + decode + NMS (median ms): batch 1 and per image at a batch."""
    run = inference_function(model, postprocess)
    one = tf.convert_to_tensor(x[:1])
    many = tf.convert_to_tensor(np.resize(x, (batch_size, *x.shape[1:])))
    run(one)
    run(many)
    single, batched = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        run(one)["num_detections"].numpy()
        single.append(time.perf_counter() - t)
    for _ in range(max(3, repeats // 4)):
        t = time.perf_counter()
        run(many)["num_detections"].numpy()
        batched.append(time.perf_counter() - t)
    return {
        "batch_1_ms": round(1000 * float(np.median(single)), 2),
        f"batch_{batch_size}_ms_per_image": round(1000 * float(np.median(batched)) / batch_size, 2),
        "threads": int(tf.config.threading.get_intra_op_parallelism_threads())
        or os.cpu_count()
        or 0,
    }


def train_detector(cfg: DetectorTrainConfig, *, export: bool = True) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (and exports unless ``export=False``).

    The summary's ``model`` entry holds the trained Keras model and ``postprocess``
    the graph post-processing it was evaluated with.
    """
    log = (lambda msg: print(msg, flush=True)) if cfg.verbose else None
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    spec = cfg.spec
    with tempfile.TemporaryDirectory(prefix="detector-data-") as tmp:
        splits = load_datasets(cfg, Path(tmp))
        # Decoded as the gateway decodes for this input (photo-sized decoding included).
        train, train_images = splits.train.decode_usable(spec)
        val, val_images = splits.validation.decode_usable(spec)
        test, test_images = splits.test.decode_usable(spec)
    data_seconds = time.monotonic() - started
    if log:
        log(
            f"data: {len(train)} training images ({train.num_boxes()} boxes), {len(val)} "
            f"validation ({val.num_boxes()} boxes), {len(test)} test ({test.num_boxes()} "
            f"boxes), labels {train.labels}; {data_seconds:.1f} s"
        )

    det_cfg = cfg.detector_config(len(train.labels))
    model = build_detector(det_cfg, seed=cfg.seed)
    anchors = generate_anchors(det_cfg.anchors, spec.height, spec.width)
    postprocess = make_postprocess(anchors, cfg.nms_config)
    batches = TrainingBatches(
        train,
        train_images,
        spec=spec,
        anchors=anchors,
        match=cfg.match_config,
        augment_config=cfg.augment_config,
        batch_size=min(cfg.batch_size, len(train)),
        seed=cfg.seed,
    )
    total_steps = batches.steps_per_epoch * cfg.epochs
    momentum = bn.resolve_momentum(cfg.bn_momentum, total_steps)
    if momentum is not None:
        bn.set_bn_momentum(model, momentum)
    if log:
        log(
            f"model: MobileNetV2 alpha {cfg.alpha} SSDLite, {model.count_params()} parameters, "
            f"{len(anchors)} anchors, input {spec.height}x{spec.width} {spec.geometry}; "
            f"{total_steps} steps, BN momentum {momentum}"
        )
    eval_bs = min(cfg.batch_size, len(val))
    stopper = EarlyStopping(
        model,
        lambda: (
            evaluate_detector(
                model, postprocess, val, spec, images=val_images, batch_size=eval_bs
            ).map_50
        ),
        eval_every=cfg.eval_every,
        patience=cfg.patience,
        epochs=cfg.epochs,
    )
    train_started = time.monotonic()
    history = fit(
        model,
        batches,
        epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        warmup_epochs=cfg.warmup_epochs,
        weight_decay=cfg.weight_decay,
        log=log,
        on_epoch_end=stopper,
        stop=stopper.should_stop,
    )
    best_epoch = stopper.restore()
    if log and best_epoch is not None:
        log(f"kept the weights of epoch {best_epoch} (validation mAP@.5 {stopper.best:.4f})")
    fit_seconds = time.monotonic() - train_started

    # The test split alone judges the model: validation chose the kept weights.
    test_bs = min(cfg.batch_size, len(test))
    before = evaluate_detector(
        model, postprocess, test, spec, images=test_images, batch_size=test_bs
    )
    if cfg.precise_bn:
        n = min(len(train_images), cfg.precise_bn_images)
        bn.precise_bn(model, image_batches(train_images[:n], spec, batches.batch_size))
    parity_report, metrics, training_mode = detection_parity(
        model,
        postprocess,
        test,
        spec,
        images=test_images,
        tolerance=cfg.max_parity_gap,
        batch_size=test_bs,
        shuffle_seed=cfg.seed,
    )
    parity = {
        **parity_report.to_dict(),
        "paired_on": PAIRED_ON,
        "map_50": {"inference_mode": metrics.map_50, "training_mode": training_mode.map_50},
    }
    x_val, _ = preprocess_images(val_images[: min(64, len(val_images))], spec)
    timing = inference_timing(model, postprocess, x_val)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "map_50_95": metrics.map_50_95,
        "map_50": metrics.map_50,
        "map_75": metrics.map_75,
        "per_class_ap": metrics.per_class_ap,
        "metrics_before_precise_bn": {"map_50_95": before.map_50_95, "map_50": before.map_50},
        "parity": parity,
        "bn_momentum": momentum if momentum is not None else "keras-default",
        "labels": train.labels,
        "train_images": len(train),
        "val_images": len(val),
        "test_images": len(test),
        "train_boxes": train.num_boxes(),
        "val_boxes": val.num_boxes(),
        "test_boxes": test.num_boxes(),
        "best_validation_map_50": stopper.best if stopper.best >= 0 else None,
        "kept_epoch": best_epoch if best_epoch is not None else len(history),
        "epochs": cfg.epochs,
        "epochs_run": len(history),
        "steps": total_steps,
        "final_loss": history[-1]["loss"],
        "history": history,
        "parameters": int(model.count_params()),
        "inference": timing,
        "fit_seconds": round(fit_seconds, 1),
        "train_seconds": round(time.monotonic() - started, 1),
        "skipped": list(dict.fromkeys(train.skipped + val.skipped + test.skipped)),
        "model": model,
        "postprocess": postprocess,
    }
    if not export:
        return summary
    try:
        if not parity_report.passed and not cfg.force:
            raise ParityError(
                f"parity check failed: {parity_report.failure}; per-image top-detection hit "
                f"rate {parity_report.inference_metric:.3f} in inference mode vs "
                f"{parity_report.training_metric:.3f} in training mode (mAP@.5 "
                f"{metrics.map_50:.3f} vs {training_mode.map_50:.3f}); moving statistics do "
                "not describe the data. Not exported (use --force to export anyway)."
            )
        result = export_detector(
            model,
            cfg,
            det_cfg,
            anchors,
            (train, train_images),
            (val, val_images),
            (test, test_images),
            metrics,
            summary,
        )
    except ExportRefused as exc:
        exc.summary = {k: v for k, v in summary.items() if k not in ("model", "postprocess")}
        raise
    summary["version"] = result.version
    summary["exported"] = str(result.path)
    summary["saved_model_bytes"] = sum(
        p.stat().st_size for p in result.path.rglob("*") if p.is_file()
    )
    return summary


def probe_layer_names(model: keras.Model, count: int = 3) -> list[str]:
    """Drift probes spread over the backbone (early, middle, late).

    Head and extra layers are left out: their inputs are tiny maps (2x2 at stride
    64) whose per-image means are noisy, and input drift shows in the backbone.
    """
    backbone = keras.Model(model.inputs, model.get_layer(BACKBONE_LAYERS[32]).output)
    return bn.select_probe_layers(backbone, count)


def export_detector(
    model: keras.Model,
    cfg: DetectorTrainConfig,
    det_cfg: DetectorConfig,
    anchors: np.ndarray,
    train_set: tuple[DetectionDataset, list[DetectionImage]],
    val_set: tuple[DetectionDataset, list[DetectionImage]],
    test_set: tuple[DetectionDataset, list[DetectionImage]],
    metrics: DetectionMetrics,
    summary: dict[str, Any],
) -> ExportResult:
    """Export with the model card's ``detection``, ``metrics``, BN, lineage and reference set.

    Each split comes as (dataset, decoded images); ``metrics`` are the test split's.
    """
    spec = cfg.spec
    (train, train_images), (_, val_images), (test, test_images) = train_set, val_set, test_set
    # The test split: calibration's mAP gate then judges on the images behind the card's mAP.
    ref_bytes = reference_set_bytes(test, test_images, spec, cfg.reference_images, cfg.seed)
    nms = cfg.nms_config
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "verbose")}
    train_x = np.concatenate(list(image_batches(train_images[:1024], spec, 64)))
    val_x, _ = preprocess_images(val_images, spec)
    card_fields = {
        "detection": {
            "model": det_cfg.to_dict(),
            "anchors": {
                **det_cfg.anchors.to_dict(),
                "count": int(len(anchors)),
                "feature_map_sizes": [
                    list(s) for s in feature_map_sizes(det_cfg.anchors, spec.height, spec.width)
                ],
                "order": "level, row, column, scale, aspect ratio",
                "format": "normalised ymin, xmin, ymax, xmax",
            },
            "box_variances": list(DEFAULT_VARIANCES),
            "box_coding": "centre-size (SSD): dy/h/v0, dx/w/v1, log(h)/v2, log(w)/v3",
            "nms": {**nms.to_dict(), "class_wise": True},
            "matching": cfg.match_config.to_dict(),
            "score": "sigmoid per class",
            "outputs": {
                "detection_boxes": "[batch, max_detections, 4] normalised ymin, xmin, ymax, xmax "
                "in model-input coordinates; map to the original image with the preprocessing "
                "geometry (ImageGeometry.boxes_to_original)",
                "detection_scores": "[batch, max_detections]",
                "detection_classes": "[batch, max_detections] float32, 0-based index into labels",
                "num_detections": "[batch] float32; rows beyond it are zero padding",
            },
        },
        "metrics": {
            **metrics.to_dict(),
            "parity": summary["parity"],
            "parity_metric": "top_detection_hit_rate",
            "test_images": summary["test_images"],
            "val_images": summary["val_images"],
            "best_validation_map_50": summary["best_validation_map_50"],
            # Which split each figure came from: validation chose the kept weights.
            "splits": SPLIT_OF,
            "evaluated_in": "inference_mode",
            "evaluator": "pycocotools COCOeval bbox, original-image pixels",
            "inference": summary["inference"],
        },
        "bn_reference": {"pixel_stats": pixel_statistics(train_x)},
        "training": {
            "bn_momentum": summary["bn_momentum"],
            "precise_bn": cfg.precise_bn,
            "epochs": cfg.epochs,
            "steps": summary["steps"],
            "final_loss": summary["final_loss"],
            "train_seconds": summary["train_seconds"],
            "augmentation": (cfg.augment_config).to_dict(),
            "loss": LossConfig().to_dict(),
        },
        "lineage": {
            "parent_version": None,
            "dataset": {
                "source": cfg.data if cfg.data != "synthetic" else "synthetic (COCO format)",
                "fingerprint": train.fingerprint,
                "train_images": summary["train_images"],
                "val_images": summary["val_images"],
            },
            "parameters": params,
        },
        "reference_set": describe_reference_set(ref_bytes),
    }
    return export_model(
        model,
        model_base=cfg.model_base,
        name=cfg.name,
        task="detection",
        spec=spec,
        labels=train.labels,
        postprocess=make_postprocess(anchors, nms),
        probe_layers=probe_layer_names(model),
        card_fields=card_fields,
        warmup_images=val_x[:8],
        version_labels=cfg.version_labels,
        extra_files={REFERENCE_SET: ref_bytes},
        drift_images=val_x,
        staleness_images=train_x,
        drift_window=min(drift_scores.DEFAULT_WINDOW, max(16, len(val_x) // 2)),
        force=cfg.force,
    )
