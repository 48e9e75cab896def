"""CalibrationConfig: the command line's flags and defaults, JSON round trip, validation."""

from __future__ import annotations

import argparse
import json

import pytest

from calibration.cli import add_calibrate_arguments, config_from_args
from calibration.config import CalibrationConfig
from calibration.errors import CalibrationError, LabelError, NotEnoughSamplesError


def test_the_command_line_parses_into_the_config_with_its_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    args = parser.parse_args(["--name", "m", "--samples", str(tmp_path)])
    assert config_from_args(args) == CalibrationConfig(name="m", samples_dir=tmp_path)
    args = parser.parse_args(
        ["--name", "m", "--samples", "s", "--prior-strength", "8", "--promote", "stable"]
        + ["--fine-tune-epochs", "0", "--min-fine-tune-labels", "5", "--seed", "3"]
    )
    config = config_from_args(args)
    assert (config.prior_strength, config.promote, config.fine_tune_epochs) == (8.0, "stable", 0)
    assert (config.min_fine_tune_labels, config.seed, config.model_base) == (5, 3, "models")


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
        {"min_samples": 0},
        {"holdout_fraction": 1.0},
        {"fine_tune_learning_rate": 0.0},
        {"fine_tune_fraction": 0.0},
    ],
)
def test_validate_refuses_options_no_run_can_use(bad):
    config = CalibrationConfig(name="m", samples_dir="s", **bad)  # recorded as asked
    with pytest.raises(ValueError):
        config.validate()


def test_calibration_errors_carry_a_code_and_no_http_status():
    codes = {e.code for e in (CalibrationError, NotEnoughSamplesError, LabelError)}
    assert len(codes) == 3
    for error in (CalibrationError, NotEnoughSamplesError, LabelError):
        assert not hasattr(error, "status")
