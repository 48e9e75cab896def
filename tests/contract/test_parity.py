"""The paired parity gate on constructed prediction vectors: it knows its own noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contract.model_card import Parity
from contract.parity import CONFIDENCE, gap_p_value, paired_interval, paired_parity

CLASSES = 10


def _labels(n: int) -> np.ndarray:
    return np.arange(n) % CLASSES


def _predict(labels: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """Predictions right on a random ``accuracy`` share, else a random wrong class."""
    right = rng.permutation(len(labels)) < round(accuracy * len(labels))
    wrong = (labels + rng.integers(1, CLASSES, len(labels))) % CLASSES
    return np.where(right, labels, wrong)


def _gate(y, inf, trn, tolerance=0.02):
    return paired_parity(
        inf == y,
        trn == y,
        tolerance=tolerance,
        inference_predictions=inf,
        training_predictions=trn,
        labels=y,
    )


@pytest.mark.parametrize("n", [50, 500, 5000])
def test_the_classic_collapse_is_refused_at_any_size(n):
    rng = np.random.default_rng(n)
    y = _labels(n)
    trn = _predict(y, 0.5, rng)
    report = _gate(y, np.zeros(n, int), trn)  # one class for everything
    assert not report.passed and report.collapsed and report.decision == "refused: collapse"
    assert "one class for 100%" in report.failure
    # Nearly everything (96 %) is a collapse too.
    almost = np.where(rng.random(n) < 0.96, 3, _predict(y, 0.5, rng))
    almost[: int(0.96 * n)] = 3
    assert _gate(y, almost, trn).collapsed


@pytest.mark.parametrize("n", [50, 500, 5000])
def test_a_40_point_gap_is_refused_at_any_size_without_a_collapse(n):
    rng = np.random.default_rng(n + 1)
    y = _labels(n)
    inf, trn = _predict(y, 0.45, rng), _predict(y, 0.85, rng)
    report = _gate(y, inf, trn)
    assert report.distinct_predictions == CLASSES and not report.collapsed
    assert not report.passed and report.decision == "refused: gap"
    assert report.gap == pytest.approx(0.4, abs=0.01)
    assert report.p_value < 1 - CONFIDENCE
    assert report.interval[0] > 0.02  # the interval says so too
    assert "significantly worse" in report.failure


@pytest.mark.parametrize("n", [50, 500, 5000])
def test_equal_modes_pass_at_any_size(n):
    rng = np.random.default_rng(n + 2)
    y = _labels(n)
    report = _gate(y, _predict(y, 0.7, rng), _predict(y, 0.7, rng))
    assert report.passed and report.decision == "pass" and report.failure == ""
    lo, hi = report.interval
    assert lo <= report.gap <= hi and lo < 0 < hi
    # The interval narrows as the images grow: about 1/sqrt(n).
    assert hi - lo < 4 / np.sqrt(n)


def test_a_smoke_run_near_chance_passes():
    """One epoch on synthetic data: both modes near chance, 0.135 vs 0.165 on 564 images."""
    rng = np.random.default_rng(7)
    y = _labels(564)
    inf, trn = _predict(y, 0.135, rng), _predict(y, 0.165, rng)
    report = _gate(y, inf, trn)
    assert report.inference_metric == pytest.approx(0.135, abs=0.001)
    assert report.training_metric == pytest.approx(0.165, abs=0.001)
    assert report.gap > 0.02  # over the tolerance, but well within the noise
    assert report.passed, report.to_dict()
    assert report.interval[0] < 0.02 < report.interval[1]


@pytest.mark.parametrize(("n", "refused"), [(50, False), (500, False), (5000, True)])
def test_a_small_steady_gap_is_refused_only_where_the_images_show_it(n, refused):
    """Inference mode wrong on 4 % of the images training mode gets right (and right on
    1 % that training mode misses): a 3-point gap, tolerance 2 points."""
    y = _labels(n)
    trn = y.copy()
    trn[: int(0.2 * n)] = (y[: int(0.2 * n)] + 1) % CLASSES  # training mode: 80 %
    inf = trn.copy()
    inf[int(0.2 * n) : int(0.24 * n)] = (y[int(0.2 * n) : int(0.24 * n)] + 1) % CLASSES
    inf[: int(0.01 * n)] = y[: int(0.01 * n)]
    report = _gate(y, inf, trn)
    assert report.gap == pytest.approx(0.03, abs=0.011)  # 50 images: 0.04
    assert report.passed is not refused, report.to_dict()


def test_the_gate_refuses_a_gap_at_the_tolerance_at_most_at_its_stated_rate():
    """Simulated pairs whose true gap equals the tolerance: refusals <= alpha (+ noise);
    and the interval covers the true gap at about its confidence."""
    rng = np.random.default_rng(11)
    n, p_b, p_c, refusals, covered, trials = 500, 0.08, 0.06, 0, 0, 400
    for _ in range(trials):
        u = rng.random(n)
        trn_right = np.where(u < p_b, True, np.where(u < p_b + p_c, False, rng.random(n) < 0.7))
        inf_right = np.where(u < p_b, False, np.where(u < p_b + p_c, True, trn_right))
        report = paired_parity(inf_right, trn_right, tolerance=p_b - p_c)
        refusals += not report.passed
        covered += report.interval[0] <= p_b - p_c <= report.interval[1]
    assert refusals / trials <= (1 - CONFIDENCE) + 0.03, refusals
    assert covered / trials >= CONFIDENCE - 0.04, covered


def test_p_value_is_mcnemars_exact_test_at_zero_tolerance():
    # McNemar exact, one-sided: P(X >= 9 | X ~ Bin(10, 1/2)) = 11 / 1024.
    assert gap_p_value(9, 1, 200, 0.0) == pytest.approx(11 / 1024)
    # Fewer discordant images than the tolerance allows: the gap cannot exceed it.
    assert gap_p_value(3, 0, 200, 0.02) == 1.0
    assert gap_p_value(0, 0, 200, 0.0) == 1.0


def test_interval_agrees_with_newcombes_worked_example():
    """Newcombe (1998), Statistics in Medicine 17:2635, worked example (a, b, c, d) =
    (36, 12, 2, 0): difference 0.2, method 10 interval 0.0569 to 0.3404."""
    lo, hi = paired_interval(36, 12, 2, 0, 0.95)
    assert lo == pytest.approx(0.0569, abs=5e-5) and hi == pytest.approx(0.3404, abs=5e-5)


def test_the_report_goes_into_the_typed_card_as_json():
    rng = np.random.default_rng(3)
    y = _labels(200)
    report = _gate(y, _predict(y, 0.6, rng), _predict(y, 0.62, rng))
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    card = Parity.from_json(doc)
    assert card.decision == "pass" and card.p_value == report.p_value
    assert tuple(card.interval) == pytest.approx(report.interval)
    assert card.discordant["training_only"] == report.training_only
    assert "McNemar" in card.test and "Newcombe" in card.interval_method
    assert card.to_json() == doc
