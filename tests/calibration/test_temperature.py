"""Temperature scaling: the fit recovers a known temperature, ECE follows its definition."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.temperature import (
    ECE_BINS,
    TemperatureFitError,
    at_bound,
    calibration_report,
    expected_calibration_error,
    fit_and_evaluate,
    fit_served_temperature,
    fit_temperature,
    nll,
    softmax,
)


def _calibrated(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (labels drawn from it)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (n, classes)) + 2.5 * np.eye(classes)[rng.integers(0, classes, n)]
    p = softmax(logits)
    u = rng.random((n, 1))
    labels = (u > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, np.minimum(labels, classes - 1)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_a_known_temperature_and_reduces_ece(true_t):
    logits, labels = _calibrated(6000, 5, seed=1)
    # A model whose logits are the calibrated ones times 1/T needs temperature T.
    distorted = logits / true_t
    fit_z, fit_y, ev_z, ev_y = distorted[:4000], labels[:4000], distorted[4000:], labels[4000:]
    fit = fit_and_evaluate(fit_z, fit_y, ev_z, ev_y)
    assert fit.temperature == pytest.approx(1.0 / true_t, rel=0.06)
    assert fit.before.ece > 0.08  # visibly mis-calibrated (over- or under-confident)
    assert fit.after.ece < 0.03 and fit.after.ece < fit.before.ece / 3
    assert fit.identified and fit.to_dict()["identified"]
    assert fit.after.nll < fit.before.nll
    assert fit.after.accuracy == fit.before.accuracy  # T never changes the arg-max
    assert fit.fitted_on == 4000 and fit.after.samples == 2000


def test_fit_minimises_nll():
    logits, labels = _calibrated(2000, 4, seed=2)
    z = logits * 1.7
    t = fit_temperature(z, labels)
    best = nll(z, labels, t)
    for other in (t * 0.9, t * 0.97, t * 1.03, t * 1.1):
        assert nll(z, labels, other) > best
    # A calibrated model is left (almost) alone.
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)


def test_separable_data_stops_at_the_bound():
    z = np.array([[1.0, 0.0], [0.0, 1.0]] * 20)
    y = np.array([0, 1] * 20)
    assert fit_temperature(z, y, bounds=(0.05, 20.0)) == pytest.approx(0.05, rel=1e-3)
    # No error to pin T down: the fit says it found no minimum inside the bounds.
    fit = fit_and_evaluate(z, y)
    assert at_bound(fit.temperature) and not fit.identified
    # One error among them is enough for a minimum inside.
    z1, y1 = np.vstack([z, [[1.0, 0.0]]]), np.append(y, 1)
    fit1 = fit_and_evaluate(z1, y1)
    assert fit1.identified and 0.05 < fit1.temperature < 20.0


def test_logits_without_information_stop_at_the_high_bound():
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 1.0, (2000, 4))
    y = rng.integers(0, 4, 2000)  # labels unrelated to the logits
    fit = fit_and_evaluate(z, y)
    assert fit.temperature == pytest.approx(20.0, rel=1e-3) and not fit.identified


def test_ece_matches_a_hand_computed_value():
    # Bins are ((m-1)/15, m/15]: 0.9, 0.9 (one right) share (13/15, 14/15];
    # 0.55 (right) and 0.58 (wrong) share (8/15, 9/15]; each bin holds half the data.
    p = np.array([[0.9, 0.1], [0.1, 0.9], [0.55, 0.45], [0.42, 0.58]])
    y = np.array([0, 0, 0, 0])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(0.5 - (0.55 + 0.58) / 2)
    assert expected_calibration_error(p, y) == pytest.approx(expected)
    assert ECE_BINS == 15
    # Perfect confidence on correct predictions: zero error.
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_report_at_a_temperature():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    labels = np.array([0, 1, 1])
    rep = calibration_report(logits, labels, temperature=2.0)
    p = softmax(logits, 2.0)
    assert rep.accuracy == pytest.approx(2 / 3)
    assert rep.nll == pytest.approx(-np.mean(np.log(p[np.arange(3), labels])))
    assert rep.to_dict()["temperature"] == 2.0 and rep.samples == 3


@pytest.mark.parametrize(
    "logits, labels",
    [
        (np.zeros((3,)), np.zeros(3, int)),  # not 2-D
        (np.zeros((3, 1)), np.zeros(3, int)),  # one class
        (np.zeros((3, 2)), np.zeros(2, int)),  # length mismatch
        (np.zeros((3, 2)), np.array([0, 1, 2])),  # label out of range
        (np.zeros((3, 2)), np.array([0.0, 1.0, 0.0])),  # float labels
        (np.array([[np.nan, 0.0]]), np.array([0])),  # not finite
        (np.zeros((0, 2)), np.zeros(0, int)),  # empty
    ],
)
def test_unusable_input_is_a_typed_error(logits, labels):
    with pytest.raises(TemperatureFitError):
        fit_temperature(logits, labels)


def test_a_temperature_the_feedback_does_not_determine_is_not_served():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 200)
    # Confident, correct logits on every labelled sample: NLL falls as T -> 0.
    separable = 4.0 * np.eye(3)[y] + rng.normal(0.0, 0.3, (200, 3))
    t, entry, fit = fit_served_temperature(
        (separable[:120], y[:120]),
        (separable[120:], y[120:]),
        separable[120:],
        1.3,
        in_sample=False,
    )
    assert t == 1.3 and fit is None
    assert entry["method"] == "inherited" and entry["temperature"] == 1.3
    assert entry["rejected_fit"] < 0.2  # the search ran towards T -> 0
    assert "not identified" in entry["note"] and "0 misclassified" in entry["note"]
    assert entry["after"]["temperature"] == 1.3  # the report is of what is served
    # With errors among them the fitted T is served.
    noisy = separable.copy()
    flip = rng.random(200) < 0.1
    noisy[flip] = np.roll(noisy[flip], 1, axis=1)
    t, entry, fit = fit_served_temperature(
        (noisy[:120], y[:120]), (noisy[120:], y[120:]), noisy[120:], 1.3, in_sample=False
    )
    assert fit is not None and fit.identified and t == fit.temperature != 1.3
    assert entry["method"] == "temperature_scaling" and entry["after"]["temperature"] == t
