"""Fine-tuning a classifier's weights on labelled feedback from drifted traffic.

Re-estimated statistics alone cannot undo what a shift destroys (noise);
labelled feedback from the new domain can teach the weights to read it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from calibration.config import CalibrationConfig
from calibration.reestimate import Reestimation
from contract import bn


def fine_tune_share(
    labelled: np.ndarray, fit: np.ndarray, unit: np.ndarray, config: CalibrationConfig
) -> np.ndarray:
    """The labelled fit samples in the fine-tuning share (``fine_tune_fraction`` by request id).

    All of them by default: the weights gain more from labels than one
    temperature does. The temperature is fitted, and every check on labelled
    traffic judged, on labelled samples outside this share.
    """
    h = config.holdout_fraction
    return labelled & fit & (unit < h + (1 - h) * config.fine_tune_fraction)


def why_not_fine_tuned(config: CalibrationConfig, domain_shift: bool, tuned: int) -> str | None:
    """Why the candidate is not fine-tuned, or None when it is."""
    if not config.fine_tune("classification")[0]:
        return "disabled (fine_tune_epochs=0)"
    if not domain_shift:
        return "the traffic has not drifted from the parent's domain"
    if tuned < config.min_fine_tune_labels:
        return f"{tuned} labelled fit samples (< {config.min_fine_tune_labels})"
    return None


def fine_tune_candidate(
    model: keras.Model,
    stats: Reestimation,
    prior_strength: float,
    feedback: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    config: CalibrationConfig,
) -> dict[str, Any]:
    """Fine-tune on ``feedback`` plus the reference set; the lineage's ``fine_tune`` entry.

    After every epoch the statistics are collected again and mixed with
    ``prior_strength`` of the source, as the candidate was before.
    """
    epochs, learning_rate = config.fine_tune("classification")
    return {
        "ran": True,
        **fine_tune_on_feedback(
            model,
            *feedback,
            reference,
            epochs=epochs,
            learning_rate=learning_rate,
            reestimate=lambda: stats.collect_again(prior_strength),
            seed=config.seed,
        ),
    }


def _train_step(
    model: keras.Model, variables: list, image_shape: tuple[int, ...], learning_rate: float
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """One compiled Adam step on ``variables`` with BN in inference mode."""
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(variables)  # slot variables before tracing: one trace, not two
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, *image_shape], tf.float32),
            tf.TensorSpec([None], tf.int64),
        ]
    )
    def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=False))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    return step


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
        step = _train_step(model, variables, xs.shape[1:], learning_rate)
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
