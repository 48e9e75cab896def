"""Datasets: class folders, deterministic split, fingerprint, class weights, synthetic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from contract.preprocessing import PreprocessSpec, normalize
from training import synthetic
from training.data import (
    class_weights,
    load_directory,
    make_dataset,
    split,
    synthetic_set,
    three_way_split,
)

SPEC = PreprocessSpec(32, 32)


def _write_folder(root, counts: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = rng.integers(0, 256, (20 + i % 7, 30, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / cls / f"{i:03d}.png")


def test_directory_loader_reads_classes_and_reports_bad_files(tmp_path):
    _write_folder(tmp_path, {"cat": 5, "dog": 3})
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    data = load_directory(tmp_path, SPEC)
    assert data.class_names == ["cat", "dog"]
    assert data.counts() == {"cat": 5, "dog": 3}
    assert data.pixels.shape == (8, 32, 32, 3) and data.pixels.dtype == np.uint8
    assert [k for k, _ in data.skipped] == ["dog/broken.jpg"]


def test_fingerprint_changes_with_content_not_with_reading_twice(tmp_path):
    _write_folder(tmp_path, {"a": 3, "b": 3})
    f1 = load_directory(tmp_path, SPEC).fingerprint
    assert load_directory(tmp_path, SPEC).fingerprint == f1
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "000.png")
    assert load_directory(tmp_path, SPEC).fingerprint != f1


def test_split_is_deterministic_and_stable_under_additions(tmp_path):
    _write_folder(tmp_path, {"a": 30, "b": 30})
    data = load_directory(tmp_path, SPEC)
    train, val = split(data, 0.25, seed=1)
    train2, val2 = split(data, 0.25, seed=1)
    assert val.keys == val2.keys and train.keys == train2.keys
    assert not set(train.keys) & set(val.keys)
    assert 5 <= len(val) <= 25
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "new.png")
    _, val3 = split(load_directory(tmp_path, SPEC), 0.25, seed=1)
    assert set(val.keys) <= set(val3.keys)


def test_class_weights_balance_an_imbalanced_set():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = class_weights(labels, 3)
    # Each class's total weight is the same: n_c * w_c = n / k.
    totals = [np.sum(labels == c) * w[c] for c in range(3)]
    np.testing.assert_allclose(totals, [100 / 3] * 3)
    assert w[2] > w[1] > w[0]
    with pytest.raises(ValueError, match="no training examples"):
        class_weights(np.array([0, 0, 1]), 3)


def test_synthetic_set_is_reproducible_and_imbalanced_as_asked():
    a = synthetic_set(SPEC, 60, seed=3, imbalance=3.0)
    b = synthetic_set(SPEC, 60, seed=3, imbalance=3.0)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.pixels, b.pixels)
    assert synthetic_set(SPEC, 60, seed=4).fingerprint != a.fingerprint
    counts = synthetic.class_counts(600, 6, 3.0)
    assert sum(counts) == 600 and counts[0] / counts[-1] == pytest.approx(3.0, rel=0.05)


def test_synthetic_images_vary_in_size_and_background():
    images, labels = synthetic.generate(30, seed=0)
    assert len({img.shape for img in images}) > 10
    assert len(set(labels.tolist())) == len(synthetic.CLASSES)
    checker, _ = synthetic.generate(4, seed=0, background="checker")
    assert all(img.dtype == np.uint8 for img in checker)


def test_pipeline_feeds_exactly_the_preprocessing_module_output():
    data = synthetic_set(SPEC, 20, seed=0)
    ds = make_dataset(data, SPEC, batch_size=8, training=False)
    xs = np.concatenate([x.numpy() for x, _ in ds])
    assert np.array_equal(xs, normalize(data.pixels, SPEC))


def test_three_way_split_is_stratified_disjoint_and_stable(tmp_path):
    _write_folder(tmp_path, {"common": 60, "rare": 6, "tiny": 3})
    data = load_directory(tmp_path, SPEC)
    train, val, test = three_way_split(data, 0.2, 0.2, seed=0)
    keys = [set(s.keys) for s in (train, val, test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert sum(len(s) for s in (train, val, test)) == len(data)
    for part in (val, test):  # every class in every held-out split, about 20% of each
        counts = part.counts()
        assert counts["rare"] >= 1 and counts["tiny"] == 1, counts
        assert 12 <= counts["common"] <= 20, counts
    assert train.counts()["tiny"] == 1
    assert three_way_split(data, 0.2, 0.2, seed=0).test.keys == test.keys
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "common" / "new.png")
    again = three_way_split(load_directory(tmp_path, SPEC), 0.2, 0.2, seed=0)
    common_test = {k for k in test.keys if k.startswith("common/")}
    assert common_test <= set(again.test.keys)  # additions never move existing images
    with pytest.raises(ValueError):
        three_way_split(data, 0.5, 0.5)


def test_few_test_images_in_a_class_are_flagged(tmp_path):
    from training.classifier import split_warnings

    _write_folder(tmp_path, {"many": 40, "few": 6})
    test = three_way_split(load_directory(tmp_path, SPEC), 0.2, 0.2).test
    warnings = split_warnings(test)
    assert len(warnings) == 1 and "'few'" in warnings[0], warnings
