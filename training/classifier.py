"""MobileNetV2 image classifier: build, train (freeze then fine-tune), check, export.

The run, in order:

1. data: class folders or the synthetic set, preprocessed once by
   :mod:`contract.preprocessing`, split deterministically; class weights from
   counts;
2. model: ``keras.applications.MobileNetV2`` (``alpha``, input size, weights
   none | imagenet | a local file) + global pooling, dropout, dense logits;
3. BN momentum set for the run length (:func:`contract.bn.momentum_for_steps`);
4. with pretrained weights, the head is trained with the backbone frozen (its
   BN layers in inference mode), then the top ``fine_tune_layers`` layers are
   unfrozen at a lower learning rate; from scratch everything trains at once;
   warm-up + cosine (or exponential) learning rate, early stopping on
   validation loss, augmentation in the input pipeline only;
5. precise BN over the training data, then the inference/training-mode parity
   check on held-out data; a failed check stops the export unless forced;
6. export (:func:`contract.export.export_model`) with the model card.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contract import bn, drift_scores
from contract.export import ExportRefused, ExportResult, export_model, pixel_statistics
from contract.preprocessing import PreprocessSpec, normalize
from training import synthetic
from training.classifier_config import (
    AUGMENTATIONS,
    PRESETS,
    ClassifierConfig,
    loosened_gates,
    parse_augment,
)
from training.data import (
    ImageSet,
    Splits,
    class_weights,
    load_directory,
    make_dataset,
    normalized_batches,
    synthetic_set,
    three_way_split,
)

# The run's configuration lives in classifier_config; its names stay importable here.
__all__ = ["PRESETS", "ClassifierConfig", "ParityError", "train_classifier", "data_splits"]

REFERENCE_SET = "reference_set.npz"
#: Fewer test images than this in a class: its held-out accuracy is a coin toss.
FEW_TEST_IMAGES = 5


class ParityError(ExportRefused):
    """Inference mode and training mode disagree: the model must not be exported."""


@keras.saving.register_keras_serializable(package="imgserve")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then cosine decay to 1% (or exponential decay) of the peak."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, kind: str = "cosine"):
        self.peak, self.warmup, self.total, self.kind = (
            peak,
            max(1, warmup_steps),
            total_steps,
            kind,
        )

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1) / self.warmup
        progress = tf.clip_by_value(
            (step - self.warmup) / max(1.0, float(self.total - self.warmup)), 0.0, 1.0
        )
        if self.kind == "cosine":
            decayed = self.peak * (0.01 + 0.99 * 0.5 * (1 + tf.cos(math.pi * progress)))
        else:
            decayed = self.peak * tf.pow(0.01, progress)
        return tf.where(step < self.warmup, warm, decayed)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup,
            "total_steps": self.total,
            "kind": self.kind,
        }


def build_classifier(
    num_classes: int, *, image_size: int, alpha: float, weights: str = "none", dropout: float = 0.2
) -> tuple[keras.Model, keras.Model]:
    """MobileNetV2 backbone + pooling, dropout, dense logits; returns (model, backbone).

    The classifier is one flat functional graph over the backbone's layers, so
    every BN layer's input is reachable for probes and precise BN.
    """
    w = None if weights in ("none", "", None) else weights
    backbone = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), alpha=alpha, include_top=False, weights=w
    )
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone.output)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(backbone.input, logits, name="mobilenetv2_classifier"), backbone


def augmentation_layers(
    spec: PreprocessSpec, seed: int, augment: str = "flip,rotate,zoom,contrast"
) -> list[keras.layers.Layer]:
    """The chosen augmentations (see :func:`parse_augment`) on normalised input.

    Horizontal flip, rotation up to ±36°, zoom ±15 %, contrast ±30 % (value range
    from the spec); "none" gives an empty list.
    """
    lo = spec.offset
    hi = 255.0 * spec.scale + spec.offset
    chosen = parse_augment(augment).split(",")
    make = {
        "flip": lambda: keras.layers.RandomFlip("horizontal", seed=seed),
        "rotate": lambda: keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=seed + 1),
        "zoom": lambda: keras.layers.RandomZoom(0.15, fill_mode="reflect", seed=seed + 2),
        "contrast": lambda: keras.layers.RandomContrast(0.3, value_range=(lo, hi), seed=seed + 3),
    }
    return [make[name]() for name in AUGMENTATIONS if name in chosen]


def classifier_postprocess(temperature: float = 1.0):
    """Signature outputs: raw ``logits`` and ``probabilities`` = softmax(logits / T)."""
    t = float(temperature)

    def post(outs: list[tf.Tensor]) -> dict[str, tf.Tensor]:
        logits = outs[0]
        return {"logits": logits, "probabilities": tf.nn.softmax(logits / t, axis=-1)}

    return post


def load_data(cfg: ClassifierConfig) -> ImageSet:
    if cfg.data == "synthetic":
        return synthetic_set(
            cfg.spec,
            cfg.synthetic_images,
            seed=cfg.seed,
            imbalance=cfg.synthetic_imbalance,
            classes=synthetic.CLASSES[: cfg.synthetic_classes],
        )
    return load_directory(cfg.data, cfg.spec)


def data_splits(cfg: ClassifierConfig, data: ImageSet) -> Splits:
    """The run's train / validation / test split of ``data`` (stratified, by path hash)."""
    return three_way_split(data, cfg.val_fraction, cfg.test_fraction, seed=cfg.seed)


def split_warnings(test: ImageSet) -> list[str]:
    """One line per class with fewer than :data:`FEW_TEST_IMAGES` test images."""
    return [
        f"class {c!r} has only {n} test image(s): its held-out accuracy is not a measurement"
        for c, n in test.counts().items()
        if n < FEW_TEST_IMAGES
    ]


def _strategy() -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _fit(
    model, train_ds, val_ds, *, epochs, lr_peak, steps_per_epoch, cfg, weights
) -> keras.callbacks.History:
    total = max(1, epochs * steps_per_epoch)
    schedule = WarmupSchedule(
        lr_peak, int(cfg.warmup_epochs * steps_per_epoch), total, cfg.schedule
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=cfg.label_smoothing
        )
        if cfg.label_smoothing
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.patience, restore_best_weights=True
        )
    ]
    verbose = cfg.verbose if cfg.verbose is not None else (1 if sys.stdout.isatty() else 2)
    return model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        class_weight=weights,
        callbacks=callbacks,
        verbose=verbose,
        # train_ds is a tf.data pipeline that reshuffles every epoch (training/data.py);
        # Keras cannot shuffle a dataset and warns on every fit when asked to (its default).
        shuffle=False,
    )


def train_classifier(cfg: ClassifierConfig, *, export: bool = True) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (and exports unless ``export=False``).

    The summary's ``model`` entry holds the trained Keras model.
    """
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    spec = cfg.spec
    data = load_data(cfg)
    train, val, test = data_splits(cfg, data)
    num_classes = len(data.class_names)
    weights = class_weights(train.labels, num_classes)

    strategy = _strategy()
    with strategy.scope():
        model, backbone = build_classifier(
            num_classes,
            image_size=cfg.image_size,
            alpha=cfg.alpha,
            weights=cfg.weights,
            dropout=cfg.dropout,
        )
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    pretrained = cfg.weights not in ("none", "", None)
    momentum = bn.resolve_momentum(cfg.bn_momentum, steps_per_epoch)
    if momentum is not None:
        bn.set_bn_momentum(model, momentum)

    aug = augmentation_layers(spec, cfg.seed, cfg.augment) or None
    print(f"augmentation: {cfg.augment} (training batches only; --augment to change)")
    train_ds = make_dataset(
        train, spec, batch_size=cfg.batch_size, training=True, seed=cfg.seed, augment=aug
    )
    val_ds = make_dataset(val, spec, batch_size=cfg.batch_size, training=False)

    history: dict[str, list[float]] = {}
    with strategy.scope():
        if pretrained:
            # Phase 1: the backbone frozen; trainable=False also runs its BN in inference mode.
            backbone.trainable = False
            h = _fit(
                model,
                train_ds,
                val_ds,
                epochs=cfg.head_epochs,
                lr_peak=cfg.learning_rate,
                steps_per_epoch=steps_per_epoch,
                cfg=cfg,
                weights=weights,
            )
            history["head"] = h.history.get("val_accuracy", [])
            # Phase 2: unfreeze the top K layers (their BN layers train with batch statistics).
            backbone.trainable = True
            k = len(backbone.layers) if cfg.fine_tune_layers < 0 else cfg.fine_tune_layers
            for layer in backbone.layers[: len(backbone.layers) - k]:
                layer.trainable = False
            lr = cfg.fine_tune_learning_rate
        else:
            lr = cfg.learning_rate
        h = _fit(
            model,
            train_ds,
            val_ds,
            epochs=cfg.epochs,
            lr_peak=lr,
            steps_per_epoch=steps_per_epoch,
            cfg=cfg,
            weights=weights,
        )
        history["train"] = h.history.get("val_accuracy", [])
        # Accuracy on the last epoch's training batches, in training mode (batch statistics).
        fit_accuracy = float((h.history.get("accuracy") or [float("nan")])[-1])
    epochs_run = len(history["train"])

    # The test split alone judges the model: validation chose the restored weights.
    test_x = normalize(test.pixels, spec)

    def parity_now() -> bn.ParityReport:
        # Training batch size, shuffled: the training-mode pass sees batches like training's.
        return bn.classification_parity(
            model,
            test_x,
            test.labels,
            threshold=cfg.max_parity_gap,
            batch_size=cfg.batch_size,
            shuffle_seed=cfg.seed,
        )

    before = parity_now()
    if cfg.precise_bn:
        # Only BN layers that trained with batch statistics get new moving statistics;
        # frozen ones were used (and trained around) with the statistics they have.
        trainable_bn = [lyr for lyr in bn.bn_layers(model) if lyr.trainable]
        # Shuffled: precise BN runs upstream layers on batch statistics, and one-class
        # batches (class folders load sorted) would give every later layer statistics
        # of class-erased inputs, which inference mode never sees (it lowered held-out
        # accuracy on digits and tripped the staleness check on a sound model).
        batches = normalized_batches(train.pixels, spec, 128, shuffle_seed=cfg.seed)
        bn.precise_bn(model, batches, layers=trainable_bn)
    parity = parity_now()

    logits = bn.predict_in_mode(model, test_x, training=False)
    pred = logits.argmax(-1)
    accuracy = float(np.mean(pred == test.labels))
    per_class = {
        c: float(np.mean(pred[test.labels == i] == i)) if (test.labels == i).any() else None
        for i, c in enumerate(data.class_names)
    }
    train_seconds = time.monotonic() - started
    summary: dict[str, Any] = {
        "name": cfg.name,
        "accuracy": accuracy,
        "per_class_accuracy": per_class,
        "parity": parity.to_dict(),
        "parity_before_precise_bn": before.to_dict(),
        "bn_momentum": momentum if momentum is not None else "keras-default",
        "class_counts": train.counts(),
        "class_weights": {data.class_names[i]: w for i, w in weights.items()},
        "train_images": len(train),
        "val_images": len(val),
        "test_images": len(test),
        "test_class_counts": test.counts(),
        # Early stopping restored the epoch of lowest validation loss: its validation
        # accuracy is a selected figure, reported beside the independent test one.
        "validation_accuracy": max(history["train"], default=float("nan")),
        "warnings": split_warnings(test) + loosened_gates(cfg),
        "epochs_run": epochs_run,
        "fit_accuracy": fit_accuracy,
        "train_seconds": round(train_seconds, 1),
        "skipped_files": data.skipped,
        "model": model,
    }
    if not export:
        return summary
    try:
        if not parity.passed and not cfg.force:
            raise ParityError(
                f"parity check failed: {parity.failure}; inference-mode accuracy "
                f"{parity.inference_metric:.3f} vs training-mode {parity.training_metric:.3f}; "
                "moving statistics do not describe the data. "
                "Not exported (use --force to export anyway)."
            )
        result = export_classifier(model, cfg, data, train, val, summary)
    except ExportRefused as exc:
        exc.summary = {k: v for k, v in summary.items() if k != "model"}
        raise
    summary["version"] = result.version
    summary["exported"] = str(result.path)
    return summary


def _reference_set(val: ImageSet, n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(val))[:n])
    buf = io.BytesIO()
    np.savez_compressed(buf, pixels=val.pixels[idx], labels=val.labels[idx])
    return buf.getvalue()


def inference_copy(model: keras.Model) -> keras.Model:
    """The same layers (weights, BN statistics) in an uncompiled model, for export.

    A compiled model's ``.keras`` file carries the optimizer, and with it the custom
    :class:`WarmupSchedule`: ``keras.models.load_model`` then fails in any process
    that has not imported this project. The served copy needs no optimizer state.
    """
    return keras.Model(model.inputs, model.outputs, name=model.name)


def export_classifier(
    model: keras.Model,
    cfg: ClassifierConfig,
    data: ImageSet,
    train: ImageSet,
    val: ImageSet,
    summary: dict,
) -> ExportResult:
    """Export with the model card: metrics, parity, pixel stats, lineage, reference set."""
    spec = cfg.spec
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "verbose")}
    # A random 2,000, not the first: the first 2,000 of class-sorted folders are a few
    # classes, whose statistics the staleness check would judge against all classes'.
    pick = np.sort(bn.iid_order(len(train), cfg.seed)[:2000])
    train_sample = normalize(train.pixels[pick], spec)
    card_fields = {
        "metrics": {
            "accuracy": summary["accuracy"],
            "per_class_accuracy": summary["per_class_accuracy"],
            "parity": summary["parity"],
            "val_images": summary["val_images"],
            "test_images": summary["test_images"],
            "validation_accuracy": summary["validation_accuracy"],
            # Which split each figure came from: validation chose the restored weights,
            # so only the test split's figures are independent of training.
            "splits": {
                "accuracy": "test",
                "per_class_accuracy": "test",
                "parity": "test",
                "validation_accuracy": "validation (early stopping: a selected figure)",
            },
            "evaluated_in": "inference_mode",
        },
        "bn_reference": {"pixel_stats": pixel_statistics(train_sample)},
        "training": {
            "class_counts": summary["class_counts"],
            "class_weights": summary["class_weights"],
            "bn_momentum": summary["bn_momentum"],
            "precise_bn": cfg.precise_bn,
            "augmentation": cfg.augment.split(",") if cfg.augment != "none" else [],
            "epochs_run": summary["epochs_run"],
            "train_seconds": summary["train_seconds"],
        },
        "lineage": {
            "parent_version": None,
            "dataset": {"source": data.source, "fingerprint": data.fingerprint},
            "parameters": params,
        },
        "reference_set": {"file": REFERENCE_SET, "images": min(cfg.reference_images, len(val))},
    }
    return export_model(
        inference_copy(model),
        model_base=cfg.model_base,
        name=cfg.name,
        task="classification",
        spec=spec,
        labels=data.class_names,
        postprocess=classifier_postprocess(1.0),
        probe_layers=bn.select_probe_layers(model),
        card_fields=card_fields,
        warmup_images=normalize(val.pixels[:8], spec),
        version_labels=cfg.version_labels,
        extra_files={REFERENCE_SET: _reference_set(val, cfg.reference_images, cfg.seed)},
        drift_images=normalize(val.pixels, spec),
        staleness_images=train_sample,
        drift_window=min(drift_scores.DEFAULT_WINDOW, max(16, len(val) // 2)),
        force=cfg.force,
    )
