"""CalibrationConfig: the command line's flags and defaults, JSON round trip, validation."""

from __future__ import annotations

import argparse
import json

import pytest

from calibration.cli import add_calibrate_arguments, config_from_args
from calibration.config import FINE_TUNE_DEFAULTS, CalibrationConfig
from calibration.errors import (
    CalibrationError,
    InvalidOptionError,
    LabelError,
    NotEnoughSamplesError,
)


def test_the_command_line_parses_into_the_config_with_its_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    args = parser.parse_args(["--name", "m", "--samples", str(tmp_path)])
    assert config_from_args(args) == CalibrationConfig(name="m", samples_dir=tmp_path)
    args = parser.parse_args(
        ["--name", "m", "--samples", "s", "--prior-strength", "8", "--promote", "stable"]
        + ["--fine-tune-epochs", "0", "--min-fine-tune-labels", "5", "--seed", "3"]
        + ["--fine-tune-weight-mix", "0.5"]
    )
    config = config_from_args(args)
    assert (config.prior_strength, config.promote, config.fine_tune_epochs) == (8.0, "stable", 0)
    assert (config.min_fine_tune_labels, config.seed, config.model_base) == (5, 3, "models")
    assert (config.fine_tune_weight_mix, config.fine_tune_learning_rate) == (0.5, None)


def test_the_config_survives_json(tmp_path):
    config = CalibrationConfig(name="m", samples_dir=tmp_path, parity_threshold=0.05)
    again = CalibrationConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.samples_dir == str(tmp_path)
    with pytest.raises(ValueError, match="unknown calibration options"):
        CalibrationConfig.from_dict({**config.to_dict(), "colour": "red"})


@pytest.mark.parametrize(
    "bad",
    [
        {"promote": "production"},
        {"prior_strength": -1.0},
        {"prior_strength": "some"},
        {"prior_strength": float("nan")},
        {"prior_strength": float("inf")},
        {"min_samples": 0},
        {"holdout_fraction": 1.0},
        {"fine_tune_learning_rate": 0.0},
        {"fine_tune_fraction": 0.0},
    ],
)
def test_validate_refuses_options_no_run_can_use(bad):
    config = CalibrationConfig(name="m", samples_dir="s", **bad)  # recorded as asked
    with pytest.raises(InvalidOptionError):  # a ValueError and a CalibrationError
        config.validate()


def test_calibration_errors_carry_a_code_and_no_http_status():
    codes = {e.code for e in (CalibrationError, NotEnoughSamplesError, LabelError)}
    assert len(codes) == 3
    for error in (CalibrationError, NotEnoughSamplesError, LabelError):
        assert not hasattr(error, "status")


def test_fine_tuning_defaults_are_the_task_s_unless_asked():
    config = CalibrationConfig(name="m", samples_dir="s")
    assert config.fine_tune("classification") == FINE_TUNE_DEFAULTS["classification"]
    assert config.fine_tune("detection") == FINE_TUNE_DEFAULTS["detection"]
    assert FINE_TUNE_DEFAULTS["classification"] != FINE_TUNE_DEFAULTS["detection"]
    asked = CalibrationConfig(name="m", samples_dir="s", fine_tune_epochs=0)
    assert asked.fine_tune("detection") == (0, FINE_TUNE_DEFAULTS["detection"][1])
    asked = CalibrationConfig(name="m", samples_dir="s", fine_tune_learning_rate=0.01)
    assert asked.fine_tune("classification") == (FINE_TUNE_DEFAULTS["classification"][0], 0.01)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="weight mix"):
            CalibrationConfig(name="m", samples_dir="s", fine_tune_weight_mix=bad).validate()
