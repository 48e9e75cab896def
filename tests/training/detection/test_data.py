"""COCO loading (and its errors) and the synthetic COCO-format generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training.detection.boxes import iou_matrix
from training.detection.data import (
    DatasetError,
    SyntheticConfig,
    load_coco,
    render_synthetic,
    write_synthetic_coco,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, write_synthetic_coco(root, 40, seed=7)


def test_synthetic_set_is_reproducible_and_seed_dependent(tmp_path, synthetic):
    _, path = synthetic
    again = write_synthetic_coco(tmp_path / "a", 40, seed=7)
    other = write_synthetic_coco(tmp_path / "b", 40, seed=8)
    assert json.loads(again.read_text()) == json.loads(path.read_text())
    assert (again.parent / "images" / "000005.png").read_bytes() == (
        path.parent / "images" / "000005.png"
    ).read_bytes()
    assert (
        json.loads(other.read_text())["annotations"] != json.loads(path.read_text())["annotations"]
    )


def test_synthetic_set_has_several_objects_of_varied_sizes_with_overlaps(synthetic):
    _, path = synthetic
    ds = load_coco(path)
    cfg = SyntheticConfig()
    assert ds.labels == list(cfg.classes) and ds.category_ids == [1, 2, 3, 4]
    counts = [len(s.boxes) for s in ds.samples]
    assert min(counts) >= cfg.min_objects and max(counts) <= cfg.max_objects and np.mean(counts) > 3
    sides = np.concatenate(
        [
            np.sqrt((s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1]))
            for s in ds.samples
        ]
    )
    assert sides.min() < 20 and sides.max() > 60  # small to large
    overlapping = sum(
        int((np.triu(iou_matrix(s.boxes, s.boxes), 1) > 0).any())
        for s in ds.samples
        if len(s.boxes) > 1
    )
    assert overlapping >= 5  # partial occlusion occurs
    for s in ds.samples:
        assert (
            np.all(s.boxes[:, :2] >= 0)
            and np.all(s.boxes[:, 2] <= s.height)
            and np.all(s.boxes[:, 3] <= s.width)
        )
        assert set(s.classes.tolist()) <= set(range(len(ds.labels)))
    assert {int(c) for s in ds.samples for c in s.classes} == set(range(4))


def test_synthetic_boxes_are_the_exact_extent_of_the_drawn_shapes():
    """On a plain background without noise or clutter, the box is where pixels differ."""
    cfg = SyntheticConfig(
        min_objects=1, max_objects=1, max_clutter=0, max_noise=0.0, backgrounds=("solid",)
    )
    for seed in range(8):
        pixels, boxes, classes = render_synthetic(np.random.default_rng(seed), cfg)
        flat = pixels.reshape(-1, 3)
        colours, counts = np.unique(flat, axis=0, return_counts=True)
        background = colours[counts.argmax()]
        shape = np.any(pixels != background, axis=-1)
        rows, cols = np.flatnonzero(shape.any(1)), np.flatnonzero(shape.any(0))
        found = [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]
        np.testing.assert_array_equal(boxes[0], found)
        assert len(classes) == 1


def test_loader_reads_user_coco_and_skips_empty_boxes(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "imgs" / "a.jpg")
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / "b.png")
    doc = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 11, "file_name": "b.png", "width": 20, "height": 20},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 0, 5]},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [2, 2, 4, 4], "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    ds = load_coco(path, tmp_path / "imgs")
    assert ds.labels == ["cat", "dog"] and ds.category_ids == [3, 7]
    a = ds.samples[0]
    np.testing.assert_allclose(a.boxes, [[2, 1, 7, 11]])
    assert a.classes.tolist() == [1]
    assert len(ds.skipped) == 1 and ds.num_boxes() == 1  # the crowd box is not a training box
    assert ds.samples[1].crowd.tolist() == [True]
    assert a.load_pixels().shape == (30, 40, 3)
    coco = ds.to_coco()
    assert {x["category_id"] for x in coco["annotations"]} == {3, 7}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d["annotations"].append(
                {"id": 9, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}
            ),
            "unknown image",
        ),
        (
            lambda d: d["annotations"].append(
                {"id": 9, "image_id": 1, "category_id": 42, "bbox": [0, 0, 1, 1]}
            ),
            "unknown category",
        ),
        (
            lambda d: d["images"].append(
                {"id": 2, "file_name": "missing.png", "width": 5, "height": 5}
            ),
            "does not exist",
        ),
        (lambda d: d.pop("categories"), "categories"),
        (lambda d: d["annotations"].clear(), "no usable boxes"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "malformed bbox"),
    ],
)
def test_loader_refuses_broken_datasets(tmp_path, mutate, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    doc = {
        "images": [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    mutate(doc)
    (tmp_path / "a.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=message):
        load_coco(tmp_path / "a.json", tmp_path)


def test_loader_errors_for_unreadable_files(tmp_path):
    with pytest.raises(DatasetError, match="no annotation file"):
        load_coco(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a readable JSON"):
        load_coco(tmp_path / "bad.json")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.png").write_bytes(b"not an image")
    doc = {
        "images": [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(doc))
    ds = load_coco(tmp_path / "a.json", tmp_path)
    with pytest.raises(DatasetError, match="cannot be used"):
        ds.samples[0].load_pixels()
    with pytest.raises(DatasetError, match="no usable images"):
        ds.decode_usable()
