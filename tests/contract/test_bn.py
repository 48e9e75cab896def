"""BN discipline: momentum policy, exact re-estimation, probes, and the seeds' bug."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from contract import bn
from contract.preprocessing import normalize
from training.classifier import build_classifier


def _tiny_model(classes: int = 3):
    keras.utils.set_random_seed(0)
    model, _ = build_classifier(classes, image_size=32, alpha=0.35)
    return model


def test_momentum_policy_suits_the_run_length():
    assert bn.momentum_for_steps(20) == 0.9
    assert bn.momentum_for_steps(250) == pytest.approx(0.98)
    assert bn.momentum_for_steps(10**6) == 0.99
    model = _tiny_model()
    n = bn.set_bn_momentum(model, 0.95)
    assert n == len(bn.bn_layers(model)) > 30
    assert all(layer.momentum == 0.95 for layer in bn.bn_layers(model))


def test_probe_layers_span_early_middle_late():
    model = _tiny_model()
    names = [layer.name for layer in bn.bn_layers(model)]
    probes = bn.select_probe_layers(model, 3)
    assert len(probes) == 3 and probes[0] == names[0] and probes[-1] == names[-1]
    assert names.index(probes[0]) < names.index(probes[1]) < names.index(probes[2])


def test_precise_bn_makes_inference_mode_equal_training_mode_on_the_same_batch():
    """With the whole data as one batch, exact statistics make the two modes identical."""
    model = _tiny_model()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (48, 32, 32, 3)).astype(np.float32)
    before = np.abs(
        bn.predict_in_mode(model, x, training=False, batch_size=48)
        - bn.predict_in_mode(model, x, training=True, batch_size=48)
    ).max()
    stats = bn.precise_bn(model, [x])
    after = np.abs(
        bn.predict_in_mode(model, x, training=False, batch_size=48)
        - bn.predict_in_mode(model, x, training=True, batch_size=48)
    ).max()
    assert before > 1e-2  # fresh moving statistics (0, 1) are wrong for this data
    assert after < 1e-3 * max(1.0, before)
    # The first BN layer's input is the stem conv of the raw input: check against numpy.
    first = bn.bn_layers(model)[0]
    conv_out = bn.bn_input_model(model, [first])(x).numpy().astype(np.float64)
    np.testing.assert_allclose(
        first.moving_mean.numpy(), conv_out.mean((0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        first.moving_variance.numpy(), conv_out.var((0, 1, 2)), rtol=1e-3, atol=1e-5
    )
    assert stats[0].images == 48


def test_precise_bn_does_not_depend_on_batching():
    model = _tiny_model()
    x = np.random.default_rng(1).uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32)
    first = bn.bn_layers(model)[0]  # upstream of it there is no BN, so batching cannot matter
    bn.precise_bn(model, [x])
    one = first.moving_variance.numpy().copy()
    bn.precise_bn(model, [x[:8], x[8:20], x[20:]])
    np.testing.assert_allclose(first.moving_variance.numpy(), one, rtol=1e-5)


def test_prior_strength_mixes_source_and_target_statistics():
    model = _tiny_model()
    first = bn.bn_layers(model)[0]
    x = np.random.default_rng(2).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
    target = bn.collect_bn_statistics(model, [x], layers=[first])[0]
    first.moving_mean.assign(np.full(first.moving_mean.shape, 5.0, np.float32))
    bn.precise_bn(model, [x], layers=[first], prior_strength=16.0)  # N = n: half and half
    np.testing.assert_allclose(first.moving_mean.numpy(), 0.5 * 5.0 + 0.5 * target.mean, rtol=1e-4)


def test_one_collection_can_be_assigned_at_several_prior_strengths():
    model = _tiny_model()
    layers = bn.bn_layers(model)
    x = np.random.default_rng(3).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
    target = bn.collect_bn_statistics(model, [x], layers=layers)
    source = [(lyr.moving_mean.numpy() + 1.0, lyr.moving_variance.numpy() * 2.0) for lyr in layers]
    before = [s.mean.copy() for s in target]
    mixed = bn.assign_statistics(layers, target, source, prior_strength=16.0)  # half and half
    np.testing.assert_allclose(
        layers[0].moving_mean.numpy(), 0.5 * source[0][0] + 0.5 * target[0].mean, rtol=1e-4
    )
    np.testing.assert_allclose(mixed[0].mean, layers[0].moving_mean.numpy(), rtol=1e-6)
    for s, mean in zip(target, before, strict=True):  # the collection is left as it was
        np.testing.assert_array_equal(s.mean, mean)
    bn.assign_statistics(layers, target, source, prior_strength=0.0)  # the samples alone
    np.testing.assert_allclose(layers[0].moving_mean.numpy(), target[0].mean, rtol=1e-6)
    np.testing.assert_allclose(layers[0].moving_variance.numpy(), target[0].variance, rtol=1e-5)


def test_parity_fails_a_constant_inference_mode_whatever_the_gap():
    """The seeds' bug's signature (one class in inference mode, several in training
    mode) fails parity even where the accuracy gap is within the limit."""
    model = _tiny_model()
    x = np.random.default_rng(4).uniform(-1, 1, (48, 32, 32, 3)).astype(np.float32)
    y = np.arange(48) % 3
    healthy = bn.classification_parity(model, x, y, threshold=1.0)
    assert healthy.distinct_predictions > 1 and healthy.passed, healthy
    for layer in bn.bn_layers(model):  # moving statistics that fit nothing: constant output
        layer.moving_variance.assign(np.full(layer.moving_variance.shape, 1e8, np.float32))
    broken = bn.classification_parity(model, x, y, threshold=1.0)
    assert broken.distinct_predictions == 1 and not broken.passed, broken
    assert "one class" in broken.failure and healthy.failure == ""
    # One class in the held-out labels as well: a constant prediction is no evidence.
    assert bn.classification_parity(model, x, np.zeros(48, int), threshold=1.0).passed


def _one_feature_classifier(spread: float) -> keras.Model:
    """Input -> BN -> nearest-centroid logits: the class is the raw feature's level,
    which a batch of one class normalises away (its batch mean is that level)."""
    inp = keras.Input((1,))
    norm = keras.layers.BatchNormalization(center=False, scale=False)
    z = norm(inp)
    centroids = (np.arange(3) - 1.0) / spread  # classes 0, 1, 2 after standardising
    dense = keras.layers.Dense(3)
    model = keras.Model(inp, dense(z))
    dense.set_weights([centroids[None, :].astype(np.float32), -(centroids**2) / 2])
    norm.moving_mean.assign([1.0])
    norm.moving_variance.assign([spread**2])
    return model


def test_parity_batches_are_iid_whatever_the_order_of_the_held_out_set():
    """Class-sorted held-out data (the order class folders load in) gives the same
    training-mode figure as a shuffled copy; read in that order, batch statistics
    of one-class batches would erase the class and training mode would score ~1/3."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 96)  # sorted by class, like load_directory's output
    x = (y + rng.normal(0, 0.1, len(y))).astype(np.float32)[:, None]
    model = _one_feature_classifier(float(np.std(x)))
    in_order = bn.predict_in_mode(model, x, training=True, batch_size=32).argmax(-1)
    assert np.mean(in_order == y) < 0.5  # the premise: sorted batches break training mode
    sorted_report = bn.classification_parity(model, x, y, threshold=0.02, batch_size=32)
    perm = rng.permutation(len(y))
    shuffled = bn.classification_parity(
        model, x[perm], y[perm], threshold=0.02, batch_size=32, shuffle_seed=7
    )
    assert sorted_report.inference_metric == pytest.approx(1.0, abs=0.01)
    assert sorted_report.training_metric > 0.95, sorted_report
    assert abs(sorted_report.gap - shuffled.gap) < 0.03, (sorted_report, shuffled)
    assert sorted_report.passed


def test_precise_bn_on_shuffled_batches_matches_what_inference_mode_sees():
    """Precise BN runs upstream BN on batch statistics: on class-sorted images (the
    order class folders load in) each batch's class is normalised away, and the
    downstream layer gets statistics inference mode never produces (the false
    staleness refusal); the classifier's shuffled batches give the ones it does."""
    from contract.preprocessing import PreprocessSpec
    from training.data import normalized_batches

    spec = PreprocessSpec(4, 4)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], [96, 32])  # sorted by class, and imbalanced
    level = 40 + 160 * y[:, None, None, None] + rng.normal(0, 4, (len(y), 4, 4, 3))
    pixels = np.clip(level, 0, 255).astype(np.uint8)
    inp = keras.Input((4, 4, 3))
    first, second = keras.layers.BatchNormalization(), keras.layers.BatchNormalization()
    model = keras.Model(inp, second(keras.layers.ReLU()(first(inp))))
    x = normalize(pixels, spec)
    first.moving_mean.assign(x.mean((0, 1, 2)))
    first.moving_variance.assign(x.var((0, 1, 2)))
    # What `second` sees in inference mode: the population-standardised input, rectified.
    seen = np.maximum((x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-3), 0)
    truth = seen.var((0, 1, 2))

    def estimate(**kw) -> np.ndarray:
        bn.precise_bn(model, normalized_batches(pixels, spec, 32, **kw), layers=[second])
        return second.moving_variance.numpy()

    assert np.all(np.abs(estimate() / truth - 1) > 0.3)  # the premise: sorted is wrong
    np.testing.assert_allclose(estimate(shuffle_seed=0), truth, rtol=0.1)


@pytest.mark.slow
def test_seeds_bug_reproduced_and_fixed(stale_run, tiny_training):
    """Keras defaults (momentum 0.999, no re-estimation) collapse in inference mode and
    the export is refused; the package's policy + precise BN pass parity on the same
    data, seed and preset (the session's default training)."""
    assert stale_run.rc == 3 and stale_run.versions == [], stale_run.stderr
    broken = stale_run.summary
    p = broken["parity"]
    # The fit learned (training mode, batch statistics, on its own batches: above chance,
    # 1/3 for 3 classes). Training mode on the small held-out set is no steadier a witness
    # than that on this tiny model: it ranged 0.25 to 0.6 between runs of the same seed.
    assert broken["bn_momentum"] == "keras-default"
    assert broken["fit_accuracy"] >= 0.45, broken["fit_accuracy"]
    # ...inference mode (the unconverged moving statistics) is caught: one constant
    # prediction, or clearly worse than training mode (the size of the gap varies
    # between runs of this tiny model: 0.035 with a constant prediction, 0.105 with three).
    assert not p["passed"], (p, stale_run.stderr)
    assert p["distinct_predictions"] == 1 or p["inference_mode"] <= p["training_mode"] - 0.05, p
    assert "parity check failed" in stale_run.stderr
    fixed = tiny_training[1]
    assert fixed["bn_momentum"] != "keras-default"
    assert fixed["parity"]["passed"], fixed["parity"]
    assert fixed["accuracy"] >= 0.55
