"""Drift scores against BN moving statistics: formulas, reference quantiles, staleness."""

from __future__ import annotations

import numpy as np
import pytest

from contract import drift_scores


def _probes(channels=(4, 8), mean=0.0, var=1.0):
    out, offset = [], 0
    for i, c in enumerate(channels):
        out.append(
            drift_scores.ProbeReference(
                f"bn{i}", offset, c, np.full(c, mean), np.full(c, var), 1e-3
            )
        )
        offset += c
    return out


def _images(n, channels, mean, std, spatial=64, seed=0):
    """Per-image spatial moments of Gaussian activations with the given mean/std."""
    rng = np.random.default_rng(seed)
    x = rng.normal(mean, std, (n, spatial, channels))
    return x.mean(1), (x**2).mean(1)


def test_scores_follow_the_documented_formulas():
    probes = _probes((3,))
    m = np.array([1.0, 0.0, -1.0])
    v = np.array([1.0, 4.0, 0.25])
    scores = drift_scores.layer_scores(m, v + m**2, probes)["bn0"]
    s2 = 1.0 + 1e-3
    vv = v + 1e-3
    expected_shift = np.sqrt(np.mean(m**2 / s2))
    expected_kl = np.mean(0.25 * (vv / s2 + s2 / vv - 2 + m**2 * (1 / vv + 1 / s2)))
    assert scores["mean_shift"] == pytest.approx(expected_shift)
    assert scores["sym_kl"] == pytest.approx(expected_kl)
    # Identical distributions score zero.
    zero = drift_scores.layer_scores(np.zeros(3), np.ones(3), probes)["bn0"]
    assert zero["mean_shift"] == 0 and zero["sym_kl"] == pytest.approx(0, abs=1e-12)


def test_in_distribution_windows_stay_below_threshold_and_shifts_exceed_it():
    probes = _probes((4, 8))
    held_m, held_s = _images(2000, 12, 0.0, 1.0, seed=1)
    ref = drift_scores.reference_quantiles(held_m, held_s, probes, window=128, windows=300)
    thr = {layer: v["mean_shift"]["threshold"] for layer, v in ref["layers"].items()}
    assert all(t > 0 for t in thr.values())
    # Fresh in-distribution windows: (almost) never above the alarm threshold.
    above = 0
    for seed in range(100):
        m, s = _images(128, 12, 0.0, 1.0, seed=100 + seed)
        scores = drift_scores.pooled_scores(m, s, probes)
        above += any(scores[layer]["mean_shift"] > thr[layer] for layer in thr)
    assert above <= 3
    # A shifted mean and a changed scale both raise the scores above the threshold.
    for mean, std in [(0.5, 1.0), (0.0, 2.0)]:
        m, s = _images(128, 12, mean, std, seed=7)
        scores = drift_scores.pooled_scores(m, s, probes)
        kl_thr = ref["layers"]["bn0"]["sym_kl"]["threshold"]
        assert scores["bn0"]["sym_kl"] > kl_thr


def test_staleness_catches_unconverged_moving_statistics():
    good = _probes((4, 8), mean=3.0, var=4.0)
    stale = _probes((4, 8), mean=0.0, var=1.0)  # what a fresh BN layer stores
    train_m, train_s = _images(1000, 12, 3.0, 2.0, seed=3)
    assert drift_scores.staleness(train_m, train_s, good)["passed"]
    report = drift_scores.staleness(train_m, train_s, stale)
    assert not report["passed"] and report["failures"]


def test_thresholds_are_read_from_the_card():
    probes = _probes((4,))
    m, s = _images(300, 4, 0.0, 1.0)
    ref = drift_scores.reference_quantiles(m, s, probes, window=64, windows=50)
    card = {"bn_reference": {"drift": ref}}
    thr = drift_scores.thresholds(card)
    assert set(thr) == {"bn0"} and set(thr["bn0"]) == set(drift_scores.SCORES)
    assert drift_scores.thresholds({"bn_reference": {}}) == {}
