"""BN statistics re-estimated on captured traffic, and the prior that mixes the source in.

One copy for classifiers and detectors: :func:`reestimate_statistics` runs
precise BN (:func:`contract.bn.collect_bn_statistics`, AdaBN) over every BN
layer on the fit samples, and :func:`search_prior` tries the source weights
of :data:`AUTO_SOURCE_WEIGHTS` for ``prior_strength="auto"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from contract import bn

#: Source weights N/(N+n) that ``prior_strength="auto"`` tries (0: the samples alone).
#: Finer near 0: the drift alarm tolerates only a little of the source mixed in.
AUTO_SOURCE_WEIGHTS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.35, 0.5, 0.65, 0.8)

Trial = dict[str, Any]


@dataclass
class Reestimation:
    """Statistics of every BN layer: ``target`` from the traffic, ``source`` the parent's."""

    layers: list[keras.layers.BatchNormalization]
    collect: Callable[[], list[bn.BNStatistics]]
    target: list[bn.BNStatistics]
    source: list[tuple[np.ndarray, np.ndarray]]

    @property
    def images(self) -> int:
        """How many traffic images the target statistics were collected on."""
        return self.target[0].images

    def assign(self, prior_strength: float) -> None:
        """Put the target statistics, mixed with ``prior_strength`` of the source, in the model."""
        bn.assign_statistics(self.layers, self.target, self.source, prior_strength=prior_strength)

    def collect_again(self, prior_strength: float) -> None:
        """Collect and assign statistics anew (the weights changed); ``target`` stays the first."""
        bn.assign_statistics(
            self.layers, self.collect(), self.source, prior_strength=prior_strength
        )

    def source_weight(self, prior_strength: float) -> float:
        """The share w = N/(N+n) of the source in statistics mixed with prior strength N."""
        return prior_strength / (prior_strength + self.images) if self.target else 0.0


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


def reestimate_statistics(
    model: keras.Model, x_fit: np.ndarray, rng: np.random.Generator, batch_size: int
) -> Reestimation:
    """Collect the statistics of every BN layer of ``model`` on ``x_fit`` (not yet assigned)."""
    layers = bn.bn_layers(model)
    collect = statistics_collector(model, layers, x_fit, rng, batch_size)
    target = collect()
    source = [(lyr.moving_mean.numpy(), lyr.moving_variance.numpy()) for lyr in layers]
    return Reestimation(layers, collect, target, source)


def try_source_weights(
    stats: Reestimation,
    measure: Callable[[float], dict[str, Any]],
    drifts: Callable[[float], bool] | None,
) -> list[Trial]:
    """Assign each of :data:`AUTO_SOURCE_WEIGHTS` in turn and record ``measure(w)``.

    Weight w on the source is prior strength N = w / (1 - w) x n (n: the target's
    images). ``drifts(w)`` says whether the held-out traffic still exceeds the
    alarm limits under the statistics assigned now (None: no alarm to check).
    The last weight tried stays assigned; the caller assigns its choice.
    """
    tried = []
    for w in AUTO_SOURCE_WEIGHTS:
        strength = w / (1.0 - w) * stats.images
        stats.assign(strength)
        tried.append(
            {
                "source_weight": w,
                "prior_strength": strength,
                **measure(w),
                "traffic_drifts": bool(drifts(w)) if drifts is not None else False,
            }
        )
    return tried


def search_prior(
    stats: Reestimation,
    measure: Callable[[float], dict[str, Any]],
    drifts: Callable[[float], bool] | None,
    *,
    reference_key: str,
    floor: float,
    rank: Callable[[Trial], Any],
    fallback_rank: Callable[[Trial], Any],
) -> tuple[float, list[Trial]]:
    """The prior strength for ``prior_strength="auto"`` and every weight tried.

    Eligible are the weights whose ``reference_key`` measure stays at or above
    ``floor`` (the parent's reference-set figure less the tolerance) and that
    leave the held-out traffic below the drift alarm: a weight that leaves the
    traffic drifted would fail the gate, so it is eligible only when every
    weight within the floor does. The best eligible one by ``rank`` wins; when
    none is within the floor, the best of all by ``fallback_rank`` (the gate
    then rejects it with the reason).
    """
    tried = try_source_weights(stats, measure, drifts)
    within = [t for t in tried if t[reference_key] >= floor]
    eligible = [t for t in within if not t["traffic_drifts"]] or within
    best = max(eligible, key=rank) if eligible else max(tried, key=fallback_rank)
    return best["prior_strength"], tried
