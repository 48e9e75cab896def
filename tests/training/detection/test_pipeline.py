"""The detector's training input path against the gateway's steps: identical tensors and
box targets for photo-sized images (drafted decode), and the full decode, bit for bit,
for cards written before photo-sized decoding."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.model_card import load_model_card
from contract.preprocessing import (
    DecodedImage,
    PreprocessSpec,
    decode_image,
    normalize,
    preprocess_pixels,
)
from tests.helpers.photo_coco import write_photo_coco
from tests.helpers.photos import photo_sized_image_bytes
from training.detection.anchors import generate_anchors
from training.detection.augment import (
    NO_AUGMENT,
    AugmentConfig,
    augment,
    decoded_frame,
    to_model_input,
)
from training.detection.boxes import pixel_boxes_to_input
from training.detection.config import PRESETS, DetectorTrainConfig
from training.detection.data import load_coco
from training.detection.evaluate import preprocess_images
from training.detection.matching import MatchConfig, match_anchors
from training.detection.pipeline import TrainingBatches, encode_example, image_batches
from training.detection.reference import reference_set_bytes

ROOT = Path(__file__).resolve().parents[3]
#: A card written before photo-sized decoding: the kept demo detector's.
OLD_CARD = ROOT / "models" / "demo_detector" / "1"
TINY = DetectorTrainConfig(**PRESETS["tiny"])


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """12 MP EXIF-rotated JPEG, 1920x1080 PNG, 16-bit TIFF."""
    return photo_sized_image_bytes()


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory, photos):
    return load_coco(write_photo_coco(tmp_path_factory.mktemp("photo-coco"), photos))


def _encode(image, sample, spec: PreprocessSpec, augment_config=NO_AUGMENT, seed: int = 0):
    anchors = generate_anchors(TINY.anchor_config, spec.height, spec.width)
    return encode_example(
        image,
        sample.boxes,
        sample.classes,
        spec=spec,
        anchors=anchors,
        match=MatchConfig(),
        augment_config=augment_config,
        rng=np.random.default_rng(seed),
    )


def test_detector_exports_decode_photo_sized():
    for preset in PRESETS.values():
        assert DetectorTrainConfig(**preset).spec.decode_oversample == 2.0
    assert DetectorTrainConfig().spec.to_dict()["decode_oversample"] == 2.0


@pytest.mark.parametrize("geometry", ["letterbox", "stretch"])
def test_training_input_path_equals_the_gateway_steps_for_photo_sized_images(
    photo_set, photos, geometry
):
    """``decode_usable(spec)`` -> ``encode_example`` (un-augmented), evaluation's and the
    reference set's preprocessing, against what the gateway's service runs
    (``decode_image(spec=...)``, ``preprocess_pixels`` of the decoded image): the same
    tensors, geometry (in original pixels) and anchor targets."""
    cfg = DetectorTrainConfig(**{**PRESETS["tiny"], "geometry": geometry})
    spec = cfg.spec
    dataset, images = photo_set.decode_usable(spec)
    assert len(dataset) == len(photos) and not dataset.skipped
    # The 12 MP JPEG really was drafted (upright 3024x4032, decoded at 1/8).
    jpeg = images[0]
    assert isinstance(jpeg, DecodedImage) and jpeg.exif_rotated
    assert jpeg.size == (3024, 4032) and jpeg.image.size == (378, 504)
    anchors = generate_anchors(cfg.anchor_config, spec.height, spec.width)
    evaluated, eval_geoms = preprocess_images(images, spec)
    ref = np.load(io.BytesIO(reference_set_bytes(dataset, images, spec, len(dataset))))
    for i, (sample, data) in enumerate(zip(dataset.samples, photos.values(), strict=True)):
        served = np.empty((spec.height, spec.width, 3), np.float32)
        _, geom = preprocess_pixels(decode_image(data, spec=spec), spec, out=served)
        assert (geom.original_width, geom.original_height) == (sample.width, sample.height)
        example = _encode(images[i], sample, spec)
        np.testing.assert_array_equal(example.x, served, err_msg=sample.path.name)
        # Targets from the gateway's geometry: what the model learns is what serving maps back.
        norm = np.clip(pixel_boxes_to_input(sample.boxes, geom), 0, 1)
        want = match_anchors(anchors, norm, sample.classes, MatchConfig())
        np.testing.assert_array_equal(example.labels, want.labels)
        np.testing.assert_array_equal(example.box_targets, want.box_targets)
        assert (example.labels > 0).sum() >= len(sample.boxes)
        np.testing.assert_array_equal(evaluated[i], served)
        assert eval_geoms[i] == geom
        np.testing.assert_array_equal(normalize(ref["pixels"][i], spec), served)
        np.testing.assert_allclose(
            ref["boxes"][ref["box_image"] == i], geom.boxes_to_input(sample.boxes), 1e-5
        )
    precise_bn = np.concatenate(list(image_batches(images, spec, 2)))
    np.testing.assert_array_equal(precise_bn, evaluated)


@pytest.mark.parametrize("geometry", ["letterbox", "stretch"])
def test_a_drafted_decode_keeps_the_full_decodes_geometry_and_box_targets(photo_set, geometry):
    spec = DetectorTrainConfig(**{**PRESETS["tiny"], "geometry": geometry}).spec
    full_spec = dataclasses.replace(spec, decode_oversample=None)
    sample = photo_set.samples[0]  # the 12 MP EXIF JPEG
    drafted, full = sample.decode(spec), sample.decode(full_spec)
    assert drafted.image.size != full.image.size
    x, boxes, geom = to_model_input(drafted, sample.boxes, spec)
    x_full, boxes_full, geom_full = to_model_input(full.pixels, sample.boxes, full_spec)
    assert geom == geom_full
    np.testing.assert_array_equal(boxes, boxes_full)
    # The pixels differ a little (a smaller decode, then the same resize), never a shift.
    diff = np.abs(x - x_full) * 127.5
    assert 0 < diff.mean() < 2


def _red_box_jpeg(width: int, height: int, box: tuple[int, int, int, int], orientation: int):
    """A white ``width x height`` (upright) JPEG with a red rectangle at ``box`` (ymin, xmin,
    ymax, xmax, upright pixels), stored turned for the EXIF ``orientation`` (1 or 6)."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    y0, x0, y1, x1 = box
    img.paste((220, 0, 0), (x0, y0, x1, y1))
    exif = Image.Exif()
    if orientation == 6:
        img = img.transpose(Image.Transpose.ROTATE_90)
        exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _red_extent(pixels: np.ndarray) -> np.ndarray:
    """(ymin, xmin, ymax, xmax) of the red pixels, max exclusive."""
    p = pixels.astype(int)
    ys, xs = np.nonzero((p[..., 0] > 150) & (p[..., 1] < 100) & (p[..., 2] < 100))
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], float)


@pytest.mark.parametrize("orientation", [1, 6])
def test_augmentation_moves_boxes_into_a_drafted_decodes_pixels(tmp_path, orientation):
    """Augmentation works on the decoded pixels: a drafted decode's boxes are scaled into
    them, and still frame the object after a flip, a crop and the final resize."""
    width, height, box = 4000, 3000, (600, 1000, 1800, 2600)
    data = _red_box_jpeg(width, height, box, orientation)
    spec = TINY.spec
    decoded = decode_image(data, spec=spec)
    assert decoded.size == (width, height) and decoded.image.size == (500, 375)
    pixels, boxes = decoded_frame(decoded, np.array([box], np.float32))
    assert pixels.shape == (375, 500, 3)
    np.testing.assert_allclose(boxes[0], _red_extent(pixels), atol=1.5)
    # A full decode is left alone.
    same, unmoved = decoded_frame(decode_image(data).pixels, np.array([box], np.float32))
    assert same.shape == (height, width, 3) and np.array_equal(unmoved[0], box)

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.jpeg").write_bytes(data)
    doc = {
        "images": [{"id": 1, "file_name": "red.jpeg", "width": width, "height": height}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [box[1], box[0], 1600, 1200]}
        ],
        "categories": [{"id": 1, "name": "red"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    dataset, images = load_coco(tmp_path / "annotations.json").decode_usable(spec)
    flip_and_crop = AugmentConfig(
        flip_probability=1.0,
        crop_probability=1.0,
        crop_min_ious=(0.3,),
        jitter_probability=0.0,
        brightness=0.0,
        contrast=(1.0, 1.0),
        saturation=(1.0, 1.0),
    )
    batches = TrainingBatches(
        dataset,
        images,
        spec=spec,
        anchors=generate_anchors(TINY.anchor_config, spec.height, spec.width),
        match=MatchConfig(),
        augment_config=flip_and_crop,
        batch_size=1,
    )
    for seed in range(5):
        rng = np.random.default_rng(seed)
        pixels, boxes = decoded_frame(images[0], dataset.samples[0].boxes)
        pixels, boxes, _ = augment(pixels, boxes, np.array([0]), rng, flip_and_crop)
        x, norm, _ = to_model_input(pixels, boxes, spec)
        red = _red_extent(np.rint((x + 1) * 127.5))
        np.testing.assert_allclose(norm[0] * spec.height, red, atol=1.5)
    x, labels, _ = next(batches.batches(1))
    assert (labels > 0).any()


@pytest.mark.parametrize("source", ["kept demo detector", "version-1 detector card"])
def test_cards_without_the_field_keep_the_full_decode_bit_for_bit(photo_set, source):
    """Training a card's spec that predates photo-sized decoding gives the tensors and
    targets of the full decode (the path before decoding took the spec), augmented or not."""
    if source == "kept demo detector":
        stored = load_model_card(OLD_CARD)["preprocessing"]
    else:
        card = ROOT / "tests" / "contract" / "data" / "model_card_v1_detector.json"
        stored = json.loads(card.read_text())["preprocessing"]
    assert "decode_oversample" not in stored
    spec = PreprocessSpec.from_dict(stored)
    dataset, images = photo_set.decode_usable(spec)
    for image, sample in zip(images, dataset.samples, strict=True):
        assert image.original_size is None  # nothing drafted
        full = sample.load_pixels()  # decode_image(bytes): no spec
        for augment_config in (NO_AUGMENT, AugmentConfig(crop_probability=1.0)):
            got = _encode(image, sample, spec, augment_config, seed=3)
            want = _encode(full, sample, spec, augment_config, seed=3)
            np.testing.assert_array_equal(got.x, want.x, err_msg=sample.path.name)
            np.testing.assert_array_equal(got.labels, want.labels)
            np.testing.assert_array_equal(got.box_targets, want.box_targets)
        x, geom = preprocess_pixels(full, spec)
        assert preprocess_images([image], spec)[1][0] == geom
        np.testing.assert_array_equal(preprocess_images([image], spec)[0][0], x)
