"""The shared gate checks: the drift limits a prior leaves."""

from __future__ import annotations

import pytest

from calibration.gate import residual_limits


def test_residual_limits_allow_what_the_source_weight_leaves():
    thresholds = {"a": {"mean_shift": 0.1, "sym_kl": 0.01}}
    parent = {"a": {"mean_shift": 1.0, "sym_kl": 0.5}}
    assert residual_limits(thresholds, parent, 0.0) == thresholds
    limits = residual_limits(thresholds, parent, 0.2)
    assert limits["a"]["mean_shift"] == pytest.approx(0.1 + 0.2 * 1.0)
    assert limits["a"]["sym_kl"] == pytest.approx(0.01 + 0.04 * 0.5)  # KL: quadratic
