"""The one preprocessing implementation: formats, modes, EXIF, errors, geometry."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.preprocessing import (
    ImageDecodeError,
    ImageGeometry,
    ImageTooLargeError,
    PreprocessSpec,
    UnusableImageError,
    decode_image,
    normalize,
    preprocess_bytes,
    preprocess_pixels,
    resize,
)
from tests.helpers.photos import exif_rotated_jpeg, photo, photo_sized, photo_sized_image_bytes
from training.data import load_directory, normalized_batches


@pytest.mark.parametrize(
    "key",
    [
        "jpeg",
        "png",
        "grey_png",
        "rgba_png",
        "palette_png",
        "palette_transparent_png",
        "grey16_png",
        "cmyk_jpeg",
        "exif_rotated_jpeg",
        "gif_animated",
        "bmp",
        "tiff",
        "tiff_multipage",
        "webp",
    ],
)
def test_every_format_and_mode_decodes_to_rgb_uint8(images, key):
    decoded = decode_image(images[key])
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3
    x, geom = preprocess_bytes(images[key], PreprocessSpec(40, 56))
    assert x.shape == (40, 56, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.mark.parametrize("key", ["jpeg", "grey_png", "rgba_png", "grey16_png", "exif_rotated_jpeg"])
@pytest.mark.parametrize("geometry", ["stretch", "letterbox"])
def test_the_decoded_image_and_its_pixels_preprocess_identically(images, key, geometry):
    """The gateway resizes the decoded image and writes into its batch; training resizes
    the pixel array into a new one: the same tensor, bit for bit."""
    decoded = decode_image(images[key])
    spec = PreprocessSpec(40, 56, geometry=geometry, offset=-1.0, scale=1 / 127.5)
    want, want_geom = preprocess_pixels(decoded.pixels, spec)
    batch = np.full((2, 40, 56, 3), np.nan, np.float32)
    got, geom = preprocess_pixels(decoded.image, spec, out=batch[1])
    assert np.shares_memory(got, batch)
    np.testing.assert_array_equal(batch[1], want)
    assert np.isnan(batch[0]).all() and geom == want_geom
    with pytest.raises(ValueError, match="RGB"):
        resize(decoded.image.convert("L"), spec)


def test_grey_is_replicated_to_three_equal_channels(images):
    px = decode_image(images["grey_png"]).pixels
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])
    assert np.array_equal(px[..., 0], np.asarray(photo("camera.png").convert("L")))


def test_sixteen_bit_is_scaled_not_clipped(images):
    grey8 = np.asarray(photo("camera.png").convert("L"))
    px = decode_image(images["grey16_png"]).pixels
    # 8-bit values v were stored as v*257; scaling by 255/65535 gives v back exactly.
    assert np.array_equal(px[..., 0], grey8)
    assert px.max() > 200  # clipping to 255 would have made almost everything white


def test_alpha_is_composited_over_the_background():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half, opaque on the right
    rgba[:, 2:, 3] = 255
    data = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(data, format="PNG")
    px = decode_image(data.getvalue(), alpha_background=(10, 20, 30)).pixels
    assert (px[:, :2] == [10, 20, 30]).all()
    assert (px[:, 2:] == [200, 0, 0]).all()


def test_palette_transparency_uses_the_background(images):
    px = decode_image(images["palette_transparent_png"], alpha_background=(1, 2, 3)).pixels
    pal = Image.open(io.BytesIO(images["palette_transparent_png"]))
    transparent = np.asarray(pal) == 0
    assert transparent.any()
    assert (px[transparent] == [1, 2, 3]).all()


def test_cmyk_converts_close_to_the_original(images):
    px = decode_image(images["cmyk_jpeg"]).pixels.astype(int)
    ref = np.asarray(photo("chelsea.png").convert("RGB")).astype(int)
    assert np.abs(px - ref).mean() < 8


def test_exif_orientation_is_applied():
    data, upright = exif_rotated_jpeg()
    decoded = decode_image(data)
    assert decoded.exif_rotated
    assert decoded.pixels.shape == upright.shape
    assert np.array_equal(decoded.pixels, upright)
    stored = decode_image(data, exif_orientation=False).pixels
    assert stored.shape == (upright.shape[1], upright.shape[0], 3)


def test_first_frame_of_animations_or_refusal(images):
    first = decode_image(images["gif_animated"])
    assert first.frames == 2
    ref = np.asarray(Image.open(io.BytesIO(images["gif_animated"])).convert("RGB"))
    assert np.array_equal(first.pixels, ref)
    with pytest.raises(UnusableImageError) as err:
        decode_image(images["gif_animated"], multi_frame="reject")
    assert err.value.code == "unusable_image"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, b"GIF89a\x01"],
)
def test_non_images_raise_decode_error(data):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.code == "undecodable_image"


@pytest.mark.parametrize("key", ["jpeg", "png"])
def test_truncated_images_raise_decode_error(images, key):
    data = images[key]
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size; the pixel data is tiny (a bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


def test_pixel_limit_refuses_decompression_bombs_before_decoding():
    with pytest.raises(ImageTooLargeError) as err:
        decode_image(_png_header_only(50_000, 50_000))
    assert err.value.code == "image_too_large"
    with pytest.raises(ImageTooLargeError):
        decode_image(_png_header_only(300, 300), max_pixels=300 * 299)


def test_stretch_resize_geometry_maps_boxes_back():
    px = np.zeros((100, 200, 3), np.uint8)
    out, geom = resize(px, PreprocessSpec(50, 50))
    assert out.shape == (50, 50, 3)
    box = geom.boxes_to_original(np.array([[0.1, 0.2, 0.5, 1.0]]))
    np.testing.assert_allclose(box, [[10, 40, 50, 200]])


def test_letterbox_keeps_aspect_and_maps_boxes_back():
    px = np.full((100, 200, 3), 255, np.uint8)
    spec = PreprocessSpec(64, 64, geometry="letterbox", pad_value=0)
    out, geom = resize(px, spec)
    # 200x100 scaled by 0.32 -> 64x32, centred vertically with 16 rows of padding.
    assert (out[:16] == 0).all() and (out[48:] == 0).all() and (out[16:48] == 255).all()
    box = geom.boxes_to_original(np.array([[16 / 64, 0.0, 48 / 64, 1.0]]))
    np.testing.assert_allclose(box, [[0, 0, 100, 200]], atol=1e-6)


@pytest.mark.parametrize("geometry", ["stretch", "letterbox"])
def test_boxes_to_input_inverts_boxes_to_original(geometry):
    spec = PreprocessSpec(64, 48, geometry=geometry, pad_value=0)
    _, geom = resize(np.zeros((90, 200, 3), np.uint8), spec)
    original = np.array([[10.0, 20.0, 80.0, 150.0], [0.0, 0.0, 90.0, 200.0]])
    inp = geom.boxes_to_input(original)
    back = geom.boxes_to_original(inp / [64, 48, 64, 48])
    np.testing.assert_allclose(back, original, atol=1e-9)
    # The whole image covers exactly the resized part of the input (not the padding).
    if geometry == "stretch":
        np.testing.assert_allclose(inp[1], [0, 0, 64, 48], atol=1e-9)
    else:  # 200x90 scaled by 0.24 -> 48x22 (rounded), centred: 21 rows of padding above
        np.testing.assert_allclose(inp[1], [21, 0, 43, 48], atol=1e-9)


def test_boxes_to_input_lands_on_the_object_pixels():
    """A box drawn on an image covers the same pixels in the letterboxed input."""
    px = np.zeros((120, 300, 3), np.uint8)
    px[30:90, 100:220] = (255, 0, 0)
    spec = PreprocessSpec(96, 96, geometry="letterbox", pad_value=0)
    out, geom = resize(px, spec)
    y0, x0, y1, x1 = geom.boxes_to_input(np.array([[30, 100, 90, 220]]))[0]
    inner = out[int(np.ceil(y0)) + 1 : int(y1) - 1, int(np.ceil(x0)) + 1 : int(x1) - 1]
    assert inner.size and (inner[..., 0] > 200).all() and (inner[..., 1:] < 50).all()
    ring = out[int(y0) - 3 : int(y1) + 3, int(x0) - 3 : int(x1) + 3]
    assert (ring[..., 0] > 200).mean() < 0.9  # the box is not larger than the image


def test_image_geometry_round_trips_through_an_array():
    _, geom = resize(np.zeros((90, 200, 3), np.uint8), PreprocessSpec(64, 48, geometry="letterbox"))
    a = geom.to_array()
    assert a.dtype == np.float64 and a.shape == (8,)
    assert a.tolist() == [getattr(geom, f.name) for f in dataclasses.fields(geom)]
    assert ImageGeometry.from_array(a) == geom
    assert isinstance(ImageGeometry.from_array(a).original_height, int)
    for bad in (a[:7], np.append(a, 1.0), np.where(np.arange(8) == 2, np.nan, a)):
        with pytest.raises(ValueError):
            ImageGeometry.from_array(bad)


def test_normalisation_is_the_spec_affine_map():
    spec = PreprocessSpec(2, 2)
    x = normalize(np.array([[[0, 127.5, 255]]], np.uint8), spec)
    np.testing.assert_allclose(x, [[[-1.0, -0.003921628, 1.0]]], atol=1e-6)


def test_resize_method_is_part_of_the_spec():
    px = np.asarray(photo("chelsea.png").convert("RGB"))
    a, _ = resize(px, PreprocessSpec(32, 32, resize_method="bilinear"))
    b, _ = resize(px, PreprocessSpec(32, 32, resize_method="nearest"))
    assert not np.array_equal(a, b)


def test_spec_round_trips_through_the_model_card_dict():
    spec = PreprocessSpec(96, 128, geometry="letterbox", alpha_background=(0, 0, 0))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({**spec.to_dict(), "mystery": 1})
    with pytest.raises(ValueError):
        PreprocessSpec(96, 96, resize_method="magic")


# -- photo-sized decoding (``decode_oversample``) ------------------------------------------
CARD_DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return photo_sized_image_bytes()


def _today(data: bytes, spec: PreprocessSpec) -> tuple[np.ndarray, object]:
    """The decode path as it was before ``decode_oversample``: full decode, pixel array."""
    spec = dataclasses.replace(spec, decode_oversample=None)
    decoded = decode_image(
        data, alpha_background=spec.alpha_background, exif_orientation=spec.exif_orientation
    )
    return preprocess_pixels(decoded.pixels, spec)


@pytest.mark.parametrize("card", ["model_card_v1_classifier.json", "model_card_v1_detector.json"])
def test_cards_without_the_field_keep_the_full_decode_bit_for_bit(card, photos, images):
    stored = json.loads((CARD_DATA / card).read_text())["preprocessing"]
    assert "decode_oversample" not in stored
    spec = PreprocessSpec.from_dict(stored)
    assert spec.decode_oversample is None
    assert spec.to_dict() == stored  # written back unchanged
    for name, data in {
        **photos,
        "jpeg": images["jpeg"],
        "exif": images["exif_rotated_jpeg"],
    }.items():
        decoded = decode_image(data, spec=spec)
        assert decoded.original_size is None, name  # nothing was drafted
        want, want_geom = _today(data, spec)
        got, geom = preprocess_bytes(data, spec)
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert geom == want_geom


@pytest.mark.parametrize(
    ("height", "width", "geometry", "scale"),
    [
        (96, 64, "stretch", 8),
        (96, 64, "letterbox", 8),
        (224, 224, "stretch", 4),
        (96, 1000, "stretch", 1),  # wide output on a sideways photo: the swap matters
    ],
)
def test_a_12mp_jpeg_decodes_drafted_but_at_least_the_factor_above_the_output(
    photos, height, width, geometry, scale
):
    data = photos["jpeg_12mp_exif"]
    spec = PreprocessSpec(height, width, geometry=geometry, decode_oversample=2.0)
    decoded = decode_image(data, spec=spec)
    # Stored 4032x3024 sideways; upright 3024x4032, which the geometry refers to.
    assert decoded.size == (3024, 4032) and decoded.exif_rotated
    w, h = decoded.image.size
    out_w, out_h = spec.output_size(3024, 4032)
    assert w >= 2 * out_w and h >= 2 * out_h
    # The smallest such scale (JPEG offers 1/2, 1/4, 1/8): one more halving would fall
    # below the factor, or there is none.
    assert (w, h) == (-(-3024 // scale), -(-4032 // scale))
    assert scale == 8 or w // 2 < 2 * out_w or h // 2 < 2 * out_h
    full, full_geom = _today(data, spec)
    fast, geom = preprocess_pixels(decoded, spec)
    assert geom == full_geom  # geometry is in original pixels either way
    diff = np.abs(fast - full) * 127.5  # in 0..255 pixel units
    assert diff.mean() < 1.5 and diff.max() < 24


def test_exif_orientation_is_applied_after_the_draft(photos):
    """A wrongly-oriented (or wrongly-sized) draft would fail against the upright photo."""
    spec = PreprocessSpec(48, 36, decode_oversample=2.0)
    upright = photo_sized("astronaut.png", 3024, 4032)
    want = np.asarray(upright.resize((36, 48), Image.Resampling.BILINEAR), np.float64)
    x, _ = preprocess_bytes(photos["jpeg_12mp_exif"], spec)
    got = (x.astype(np.float64) + 1.0) * 127.5
    assert np.abs(got - want).mean() < 3
    for turned in (np.rot90(want, 2), np.fliplr(want)):
        assert np.abs(got - turned).mean() > 15


@pytest.mark.parametrize("key", ["png_1920x1080", "tiff_16bit"])
def test_large_non_jpeg_images_use_the_reducing_resize(photos, key):
    spec = PreprocessSpec(96, 96, decode_oversample=2.0)
    decoded = decode_image(photos[key], spec=spec)
    assert decoded.original_size is None  # no draft outside JPEG: decoded in full
    got, _ = preprocess_pixels(decoded, spec)
    reduced = decoded.image.resize((96, 96), Image.Resampling.BILINEAR, reducing_gap=2.0)
    np.testing.assert_array_equal(got, normalize(np.asarray(reduced), spec))
    full, _ = _today(photos[key], spec)
    assert not np.array_equal(got, full)  # the factor took effect
    assert (np.abs(got - full) * 127.5).mean() < 1.5


def test_letterbox_boxes_map_back_to_the_original_after_a_draft(photos):
    spec = PreprocessSpec(64, 64, geometry="letterbox", pad_value=0, decode_oversample=2.0)
    x, geom = preprocess_bytes(photos["jpeg_12mp_exif"], spec)
    # Upright 3024x4032 scaled by 64/4032 -> 48x64, centred with 8 columns of padding.
    assert (x[:, :8] == -1.0).all() and (x[:, 56:] == -1.0).all()
    box = geom.boxes_to_original(np.array([[0.0, 8 / 64, 1.0, 56 / 64]]))
    np.testing.assert_allclose(box, [[0, 0, 4032, 3024]], atol=1e-6)


def test_decode_oversample_is_validated_and_round_trips():
    spec = PreprocessSpec(96, 96, decode_oversample=2.0)
    assert spec.to_dict()["decode_oversample"] == 2.0
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="decode_oversample"):
        PreprocessSpec(96, 96, decode_oversample=0.5)


@pytest.mark.parametrize("geometry", ["stretch", "letterbox"])
def test_photo_sized_parity_of_the_training_input_path_and_the_gateway_steps(
    photos, tmp_path, geometry
):
    """``training.data.load_directory`` against the steps the gateway's service runs
    (``decode_image(spec=...)``, then ``preprocess_pixels`` of the decoded image into a
    batch row): identical tensors for a 12 MP EXIF JPEG, a 1920x1080 PNG, a 16-bit TIFF."""
    spec = PreprocessSpec(96, 80, geometry=geometry, decode_oversample=2.0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    for name, data in photos.items():
        ext = Image.open(io.BytesIO(data)).format.lower()
        (tmp_path / "a" / f"{name}.{ext}").write_bytes(data)
    (tmp_path / "b" / "x.jpeg").write_bytes(photos["jpeg_12mp_exif"])
    training_set = load_directory(tmp_path, spec)
    trained = next(normalized_batches(training_set.pixels, spec, 100))
    batch = np.empty((len(photos), 96, 80, 3), np.float32)
    for i, data in enumerate(photos.values()):
        preprocess_pixels(decode_image(data, spec=spec), spec, out=batch[i])
    np.testing.assert_array_equal(trained[: len(photos)], batch)
