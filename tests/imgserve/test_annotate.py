"""Detections drawn onto the photo as the gateway saw it, and where each drawing goes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imgserve.annotate import OutputError, annotate, colour_of, output_paths
from tests.helpers.photos import exif_rotated_jpeg, photo


def _jpeg() -> bytes:
    buf = io.BytesIO()
    photo("chelsea.png").convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _detection(index: int, xmin: float, ymin: float, xmax: float, ymax: float) -> dict:
    box = {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}
    return {"label": f"class{index}", "index": index, "score": 0.87, "box": box}


def test_the_outline_is_drawn_in_the_class_colour_and_the_inside_is_kept():
    data = _jpeg()
    original = Image.open(io.BytesIO(data)).convert("RGB")
    drawn = annotate(data, [_detection(1, 100.4, 80.0, 300.0, 250.0)])
    assert drawn.size == original.size == (451, 300)
    before, after = original.load(), drawn.load()
    for edge in [(100, 200), (300, 200), (200, 250), (101, 200)]:  # left, right, bottom
        assert after[edge] == colour_of(1) != before[edge], edge
    for inside in [(200, 200), (104, 200), (50, 200)]:  # inside the box, and outside it
        assert after[inside] == before[inside], inside


def _share_in_colour(image: Image.Image, area: tuple[int, int, int, int], colour) -> float:
    pixels = list(image.crop(area).getdata())
    return sum(p == colour for p in pixels) / len(pixels)


def test_the_label_tag_sits_above_the_box_or_inside_it_at_the_top_edge():
    data = _jpeg()
    original = Image.open(io.BytesIO(data)).convert("RGB")
    drawn = annotate(data, [_detection(0, 100, 80, 300, 250), _detection(2, 20, 0, 60, 40)])
    # A tag in the class colour with white text just above the first box's corner...
    above = (103, 70, 140, 79)
    assert _share_in_colour(drawn, above, colour_of(0)) > 0.25
    light = [p for p in drawn.crop(above).getdata() if min(p) > 180]  # anti-aliased text
    assert len(light) > 10
    assert _share_in_colour(original, above, colour_of(0)) == 0
    # ... and inside the second box, which touches the top of the image.
    inside = (23, 2, 60, 10)
    assert _share_in_colour(drawn, inside, colour_of(2)) > 0.25
    assert _share_in_colour(original, inside, colour_of(2)) == 0


def test_an_exif_rotated_photo_is_drawn_upright():
    data, upright = exif_rotated_jpeg()
    drawn = annotate(data, [_detection(0, 10, 10, 50, 50)])
    assert drawn.size == (upright.shape[1], upright.shape[0]) == (451, 300)


def test_one_file_goes_to_the_named_file_or_into_a_directory(tmp_path):
    assert output_paths(["a/cat.jpg"], str(tmp_path / "boxes.jpg")) == [tmp_path / "boxes.jpg"]
    assert output_paths(["a/cat.jpg"], str(tmp_path)) == [tmp_path / "cat.png"]
    assert output_paths(["cat.jpg"], "new/") == [tmp_path.__class__("new/cat.png")]
    with pytest.raises(OutputError, match="no image format for .txt"):
        output_paths(["cat.jpg"], str(tmp_path / "boxes.txt"))


def test_several_files_go_into_a_directory_one_png_each(tmp_path):
    out = tmp_path / "drawn"
    paths = output_paths(["a/cat.jpg", "b/dog.webp"], str(out))
    assert paths == [out / "cat.png", out / "dog.png"]
    with pytest.raises(OutputError, match="would both be written to"):
        output_paths(["a/cat.jpg", "b/cat.png"], str(out))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(OutputError, match="must be a directory"):
        output_paths(["a/cat.jpg", "b/dog.jpg"], str(tmp_path / "file.png"))
