"""Run configuration and command line: presets, flags, data selection, errors (no training)."""

from __future__ import annotations

import argparse

import numpy as np
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


def test_coco_data_is_split_three_ways_or_paired_with_a_held_out_file(tmp_path):
    train_json = write_synthetic_coco(tmp_path / "a", 40, seed=1)
    cfg = DetectorTrainConfig(data=str(train_json), val_fraction=0.2, test_fraction=0.2)
    train, val, test = load_datasets(cfg, tmp_path)
    assert len(train) + len(val) + len(test) == 40
    # By hash, so about the fractions: 8 each expected, binomial spread on 40 images.
    assert 3 <= len(val) <= 15 and 3 <= len(test) <= 15, (len(val), len(test))
    ids = [{s.image_id for s in d.samples} for d in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # Deterministic: the same files land on the same side again.
    again = load_datasets(cfg, tmp_path)
    assert [s.image_id for s in again.test.samples] == [s.image_id for s in test.samples]
    val_json = write_synthetic_coco(tmp_path / "b", 8, seed=2)
    train, val, test = load_datasets(
        DetectorTrainConfig(data=str(train_json), val_data=str(val_json)), tmp_path
    )
    assert len(train) == 40 and len(val) + len(test) == 8 and len(val) and len(test)
    other = write_synthetic_coco(tmp_path / "c", 2, seed=3)
    other.write_text(other.read_text().replace('"circle"', '"disc"'))
    with pytest.raises(DatasetError, match="differ"):
        load_datasets(DetectorTrainConfig(data=str(train_json), val_data=str(other)), tmp_path)


def test_every_class_reaches_validation_and_test(tmp_path):
    """Stratified by each image's most frequent class, as the classifier's splits are."""
    from training.detection.data import load_coco
    from training.detection.splits import image_strata, three_way

    ds = load_coco(write_synthetic_coco(tmp_path / "a", 60, seed=4))
    splits = three_way(ds, 0.15, 0.15, seed=0)
    strata = set(image_strata(ds).tolist())
    for part in (splits.validation, splits.test):
        assert set(image_strata(part).tolist()) == strata


def test_synthetic_data_has_three_separate_draws(tmp_path):
    cfg = DetectorTrainConfig(synthetic_images=6, synthetic_val_images=3, synthetic_test_images=4)
    train, val, test = load_datasets(cfg, tmp_path)
    assert (len(train), len(val), len(test)) == (6, 3, 4)
    pixels = [d.samples[0].load_pixels() for d in (train, val, test)]
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[1], pixels[2])
    with pytest.raises(ValueError, match="test_fraction"):
        DetectorTrainConfig(val_fraction=0.5, test_fraction=0.5)


def test_command_line_errors_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_detector(_parser().parse_args(["--name", "d", "--data", str(tmp_path / "none.json")]))
    assert exc.value.code == 2
    assert "no annotation file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_detector(_parser().parse_args(["--name", "d", "--image-size", "16"]))
    assert exc.value.code == 2
    assert "at least 32x32" in capsys.readouterr().err
