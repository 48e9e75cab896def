"""Run configuration and command line: presets, flags, data selection, errors (no training)."""

from __future__ import annotations

import argparse

import pytest

from training.detection.cli import add_detector_arguments, config_from_args, run_detector
from training.detection.config import PRESETS, DetectorTrainConfig
from training.detection.data import DatasetError, write_synthetic_coco
from training.detection.train import load_datasets


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_detector_arguments(parser)
    return parser


def test_command_line_flags_override_the_preset():
    parser = _parser()
    args = parser.parse_args(
        [
            "--name",
            "d",
            "--preset",
            "demo",
            "--epochs",
            "3",
            "--strides",
            "16,32,64",
            "--no-augment",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.epochs == 3 and cfg.strides == (16, 32, 64) and cfg.augment is False
    assert cfg.image_size == PRESETS["demo"]["image_size"] and cfg.name == "d"
    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["--name", "d", "--image-size", "16"]))


def test_coco_data_is_split_or_paired_with_a_held_out_file(tmp_path):
    train_json = write_synthetic_coco(tmp_path / "a", 20, seed=1)
    cfg = DetectorTrainConfig(data=str(train_json), val_fraction=0.25)
    train, val = load_datasets(cfg, tmp_path)
    assert len(train) == 15 and len(val) == 5
    assert not {s.image_id for s in train.samples} & {s.image_id for s in val.samples}
    val_json = write_synthetic_coco(tmp_path / "b", 4, seed=2)
    train, val = load_datasets(
        DetectorTrainConfig(data=str(train_json), val_data=str(val_json)), tmp_path
    )
    assert len(train) == 20 and len(val) == 4
    other = write_synthetic_coco(tmp_path / "c", 2, seed=3)
    other.write_text(other.read_text().replace('"circle"', '"disc"'))
    with pytest.raises(DatasetError, match="differ"):
        load_datasets(DetectorTrainConfig(data=str(train_json), val_data=str(other)), tmp_path)


def test_command_line_errors_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_detector(_parser().parse_args(["--name", "d", "--data", str(tmp_path / "none.json")]))
    assert exc.value.code == 2
    assert "no annotation file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_detector(_parser().parse_args(["--name", "d", "--image-size", "16"]))
    assert exc.value.code == 2
    assert "at least 32x32" in capsys.readouterr().err
