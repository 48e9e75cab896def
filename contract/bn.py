"""BatchNorm discipline: momentum policy, exact re-estimation, probes, parity.

Keras' MobileNetV2 builds its BN layers with momentum 0.999: the moving
statistics have a time constant of 1000 steps, so after a short run they are
still close to their initial values (mean 0, variance 1). The model looks fine
in training mode (batch statistics) and predicts a constant in inference mode.
This module is the answer, used by training, export, drift and calibration:

- :func:`momentum_for_steps` / :func:`set_bn_momentum`: a momentum that suits
  the run length, so validation in inference mode is meaningful during training;
- :func:`precise_bn`: after training, every BN layer's moving mean/variance is
  replaced by the exact population statistics of its input over a pass of data
  (cumulative average of per-batch sums of x and x², "precise BN"). Calibration
  calls the same routine on captured traffic, optionally mixed with the source
  statistics by a prior weight N/(N+n);
- :func:`select_probe_layers`: the BN layers (early, middle, late) whose input
  statistics the exported signature reports per image for drift monitoring;
- :func:`classification_parity`: inference-mode vs training-mode accuracy on
  held-out data, judged by the paired gate of :mod:`contract.parity` before export.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace

import keras
import numpy as np
import tensorflow as tf

# ParityReport stays importable from here: the report classification_parity returns.
from contract.parity import ParityReport, paired_parity


def bn_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of ``model`` (nested models flattened), in graph order."""
    found: list[keras.layers.BatchNormalization] = []

    def visit(layer: keras.layers.Layer) -> None:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            for sub in layer.layers:
                visit(sub)

    for layer in model.layers:
        visit(layer)
    return found


def momentum_for_steps(
    steps_per_epoch: int, *, minimum: float = 0.9, maximum: float = 0.99
) -> float:
    """A BN momentum whose averaging window is about a fifth of an epoch.

    With momentum m the moving average forgets with a time constant of 1/(1-m)
    steps. Validation runs in inference mode once an epoch (and early stopping
    acts on it), so the statistics must describe the weights of the last part of
    the epoch, not those of thousands of steps ago: short epochs get ``minimum``
    (0.9, a 10-step window), long ones up to ``maximum`` (0.99). The Keras
    default, 0.999, needs thousands of steps to converge. Precise BN replaces
    these statistics after training in any case.
    """
    if steps_per_epoch <= 0:
        return minimum
    return float(min(maximum, max(minimum, 1.0 - 5.0 / steps_per_epoch)))


def resolve_momentum(setting: str | float, steps: int) -> float | None:
    """The BN momentum a run's ``bn_momentum`` setting asks for.

    ``"keras"`` keeps each layer's own (None), ``"auto"`` is :func:`momentum_for_steps`
    of ``steps``, a number is used as given.
    """
    if setting == "keras":
        return None
    if setting == "auto":
        return momentum_for_steps(steps)
    return float(setting)


def set_bn_momentum(model: keras.Model, momentum: float) -> int:
    """Set the momentum of every BN layer; returns how many layers were changed."""
    layers = bn_layers(model)
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


def select_probe_layers(model: keras.Model, count: int = 3) -> list[str]:
    """Names of ``count`` BN layers spread from early to late (first, ..., last)."""
    layers = bn_layers(model)
    if not layers:
        raise ValueError("model has no BatchNormalization layers to probe")
    count = min(count, len(layers))
    if count == 1:
        return [layers[-1].name]
    idx = [round(i * (len(layers) - 1) / (count - 1)) for i in range(count)]
    return [layers[i].name for i in sorted(set(idx))]


def _layer_by_name(model: keras.Model, name: str) -> keras.layers.BatchNormalization:
    for layer in bn_layers(model):
        if layer.name == name:
            return layer
    raise KeyError(f"no BatchNormalization layer named {name!r}")


def bn_input_model(
    model: keras.Model, layers: list[keras.layers.BatchNormalization]
) -> keras.Model:
    """A model from ``model``'s input to the inputs of ``layers`` (shares weights)."""
    return keras.Model(model.input, [layer.input for layer in layers])


@dataclass
class BNStatistics:
    """Exact per-channel statistics of one BN layer's input over a dataset."""

    name: str
    mean: np.ndarray
    variance: np.ndarray
    count: float  # number of spatial positions pooled (images * H * W)
    images: int


def collect_bn_statistics(
    model: keras.Model,
    batches: Iterable[np.ndarray | tf.Tensor],
    *,
    layers: list[keras.layers.BatchNormalization] | None = None,
    max_batches: int | None = None,
) -> list[BNStatistics]:
    """Population mean/variance of each BN layer's input, accumulated exactly.

    The model runs in training mode, as in precise BN: each layer sees its input
    normalised upstream by batch statistics, the distribution the trained weights
    expect. Sums of x and x² are accumulated in float64 over every position of
    every batch, so the result does not depend on a momentum, nor on the order of
    i.i.d. batches. The batches must be i.i.d. draws: upstream layers normalise by
    batch statistics, so one-class batches (class folders read in order) give the
    later layers statistics of inputs with the class erased, which inference mode
    never produces. Moving statistics are left as they were (snapshot and restore).
    """
    layers = layers if layers is not None else bn_layers(model)
    names = tuple(layer.name for layer in layers)

    def build(m: keras.Model) -> Callable:
        collector = bn_input_model(m, probe_layers(m, list(names)))

        def moments(x: tf.Tensor) -> list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
            outs = collector(x, training=True)
            outs = outs if isinstance(outs, list | tuple) else [outs]
            result = []
            for t in outs:
                axes = list(range(len(t.shape) - 1))
                n = tf.cast(tf.reduce_prod(tf.shape(t)[:-1]), tf.float64)
                t64 = tf.cast(t, tf.float64)
                result.append((tf.reduce_sum(t64, axes), tf.reduce_sum(tf.square(t64), axes), n))
            return result

        return moments

    saved = _snapshot(layers)
    try:
        s1 = [np.zeros(int(layer.moving_mean.shape[0]), np.float64) for layer in layers]
        s2 = [np.zeros_like(a) for a in s1]
        counts = [0.0] * len(layers)
        images = 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = tf.convert_to_tensor(batch, tf.float32)
            images += int(batch.shape[0])
            # One graph for every batch size (a last, smaller batch must not trace
            # the whole network again) and for every collection on this model.
            moments = traced(model, ("bn_inputs", names), tuple(batch.shape), build)
            for j, (a, b, n) in enumerate(moments(batch)):
                s1[j] += a.numpy()
                s2[j] += b.numpy()
                counts[j] += float(n.numpy())
    finally:
        _restore(layers, saved)
    if images == 0:
        raise ValueError("no batches to estimate BatchNorm statistics from")
    stats = []
    for layer, a, b, n in zip(layers, s1, s2, counts, strict=True):
        mean = a / n
        var = np.maximum(b / n - mean**2, 0.0)
        stats.append(BNStatistics(layer.name, mean, var, n, images))
    return stats


def precise_bn(
    model: keras.Model,
    batches: Iterable[np.ndarray | tf.Tensor],
    *,
    layers: list[keras.layers.BatchNormalization] | None = None,
    max_batches: int | None = None,
    prior_strength: float = 0.0,
) -> list[BNStatistics]:
    """Replace every BN layer's moving statistics by exact ones over ``batches``.

    ``prior_strength`` N > 0 mixes the current (source) statistics in as N
    pseudo-images against the n images seen (Schneider et al. 2020): mean and
    second moment are averaged with weights N/(N+n) and n/(N+n). 0 means the
    data alone decides (training; full adaptation).

    ``layers`` restricts the update (default: every BN layer); the others keep
    their statistics but still shape what the updated layers see.

    Returns the statistics that were written.
    """
    layers = layers if layers is not None else bn_layers(model)
    stats = collect_bn_statistics(model, batches, layers=layers, max_batches=max_batches)
    source = [(lyr.moving_mean.numpy(), lyr.moving_variance.numpy()) for lyr in layers]
    return assign_statistics(layers, stats, source, prior_strength=prior_strength)


def assign_statistics(
    layers: list[keras.layers.BatchNormalization],
    stats: list[BNStatistics],
    source: list[tuple[np.ndarray, np.ndarray]],
    *,
    prior_strength: float = 0.0,
) -> list[BNStatistics]:
    """Write ``stats`` into ``layers``, mixed with ``source`` (mean, variance) by the prior.

    With N = ``prior_strength`` and n the images behind ``stats``, mean and
    second moment are averaged with weights N/(N+n) (source) and n/(N+n).
    Returns the statistics written (new objects; ``stats`` is not modified), so
    one collection can be tried at several prior strengths.
    """
    written = []
    for layer, s, (mu, sigma2) in zip(layers, stats, source, strict=True):
        mean, var = s.mean, s.variance
        if prior_strength > 0:
            w = prior_strength / (prior_strength + s.images)
            mu = np.asarray(mu, np.float64)
            sigma2 = np.asarray(sigma2, np.float64)
            second = w * (sigma2 + mu**2) + (1 - w) * (var + mean**2)
            mean = w * mu + (1 - w) * mean
            var = np.maximum(second - mean**2, 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))
        written.append(replace(s, mean=mean, variance=var))
    return written


def _snapshot(layers: list[keras.layers.BatchNormalization]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(lyr.moving_mean.numpy().copy(), lyr.moving_variance.numpy().copy()) for lyr in layers]


def _restore(layers, saved) -> None:
    for layer, (mean, var) in zip(layers, saved, strict=True):
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(var)


def probe_reference(model: keras.Model, probe_names: list[str]) -> list[dict]:
    """The model card's per-probe reference: moving stats, epsilon, channel offsets."""
    probes, offset = [], 0
    for name in probe_names:
        layer = _layer_by_name(model, name)
        channels = int(layer.moving_mean.shape[0])
        probes.append(
            {
                "name": name,
                "channels": channels,
                "offset": offset,
                "moving_mean": [float(v) for v in layer.moving_mean.numpy()],
                "moving_variance": [float(v) for v in layer.moving_variance.numpy()],
                "epsilon": float(layer.epsilon),
            }
        )
        offset += channels
    return probes


def probe_layers(
    model: keras.Model, probe_names: list[str]
) -> list[keras.layers.BatchNormalization]:
    """The BN layer objects for ``probe_names``, in the given order."""
    return [_layer_by_name(model, n) for n in probe_names]


def probe_moments(probe_inputs: list[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image spatial mean of x and x² at each probe input, concatenated over probes.

    This is the ``bn_input_mean`` / ``bn_input_sqmean`` contract: shape
    ``[batch, total probe channels]``, probes in card order.
    """
    means, sqmeans = [], []
    for t in probe_inputs:
        axes = list(range(1, len(t.shape) - 1))
        means.append(tf.reduce_mean(t, axes))
        sqmeans.append(tf.reduce_mean(tf.square(t), axes))
    return tf.concat(means, -1), tf.concat(sqmeans, -1)


#: Traced functions of live models (see :func:`traced`).
_TRACED: dict[tuple, Callable] = {}


def traced(model: keras.Model, name: Hashable, shape: tuple[int, ...], build: Callable) -> Callable:
    """``build(model)`` (a function of a batch) traced once for any batch size, for this
    model's life; ``name`` tells apart the functions of one model.

    Eager calls of a MobileNetV2 cost about half a second per chunk in Python
    dispatch, and calibration evaluates a model dozens of times. The cache holds
    the trace, which holds the model's variables but not the model (a weak
    reference): the entry goes when the model does. The layers' ``trainable``
    flags (a frozen BN layer runs in inference mode) are part of the key.
    """
    flags = tuple(layer.trainable for layer in bn_layers(model))
    key = (id(model), name, tuple(shape[1:]), flags)
    fn = _TRACED.get(key)
    if fn is None:
        ref = weakref.ref(model)

        def call(x: tf.Tensor):
            return build(ref())(x)

        spec = tf.TensorSpec([None, *shape[1:]], tf.float32)
        fn = _TRACED[key] = tf.function(call).get_concrete_function(spec)
        weakref.finalize(model, _TRACED.pop, key, None)
    return fn


def predict_in_mode(
    model: keras.Model, x: np.ndarray, *, training: bool, batch_size: int = 64
) -> np.ndarray:
    """Run ``model`` on ``x`` with BN in the given mode; dropout always off.

    Training mode here means "BN normalises by batch statistics": dropout rates
    are zeroed for the call and BN moving statistics are restored afterwards, so
    the model is unchanged.
    """
    layers = bn_layers(model)
    saved = _snapshot(layers) if training else None
    dropouts = [lyr for lyr in model.layers if isinstance(lyr, keras.layers.Dropout)]
    rates = [d.rate for d in dropouts]
    try:
        for d in dropouts:
            d.rate = 0.0
        outs = []
        # Traced with dropout off, as it runs here.
        forward = traced(
            model, ("forward", training), x.shape, lambda m: lambda t: m(t, training=training)
        )
        # Near-equal batches: a small remainder batch would give training mode
        # (batch statistics) a handicap that has nothing to do with the model.
        for chunk in np.array_split(x, max(1, math.ceil(len(x) / batch_size))):
            out = forward(tf.convert_to_tensor(chunk, tf.float32))
            outs.append(out.numpy() if not isinstance(out, list | tuple | dict) else out)
        if isinstance(outs[0], np.ndarray):
            return np.concatenate(outs)
        return outs
    finally:
        for d, r in zip(dropouts, rates, strict=True):
            d.rate = r
        if saved is not None:
            _restore(layers, saved)


def iid_order(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(n)``: the order a training-mode pass reads
    held-out images in, so each batch is an i.i.d. draw (see
    :func:`classification_parity`), never a run of one class."""
    return np.random.default_rng(seed).permutation(n)


def classification_parity(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    threshold: float = 0.02,
    batch_size: int = 64,
    shuffle_seed: int = 0,
) -> ParityReport:
    """Accuracy in inference mode vs training mode (batch statistics) on held-out data,
    judged by the paired gate of :mod:`contract.parity` (``threshold``: its tolerance).

    Training mode sees the images in a seeded random order, in batches of
    ``batch_size`` (pass the training batch size): the statistics it normalises
    by are then those of batches like the ones it trained on, whatever order
    ``x`` is in. Both modes score the same images, and the gate pairs them.
    """
    inf = predict_in_mode(model, x, training=False, batch_size=batch_size).argmax(-1)
    # Training mode normalises by batch statistics, so the batches must look like the
    # training batches: i.i.d. draws. Held-out sets read from class folders are sorted
    # by class, and a one-class batch's statistics describe no training batch (on
    # class-sorted digits this scored 0.29 where shuffled batches scored 0.85).
    order = iid_order(len(x), shuffle_seed)
    trn = np.empty(len(x), np.int64)
    trn[order] = predict_in_mode(model, x[order], training=True, batch_size=batch_size).argmax(-1)
    return paired_parity(
        inf == y,
        trn == y,
        tolerance=threshold,
        inference_predictions=inf,
        training_predictions=trn,
        labels=y,
    )
