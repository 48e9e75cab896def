"""What clients send: the bad-input table, body forms, and training/serving preprocessing parity."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.preprocessing import PreprocessSpec
from serving.app import create_app
from tests.helpers.gateway import settings_for
from tests.helpers.photo_coco import write_photo_coco
from tests.helpers.photos import exif_rotated_jpeg, photo_sized_image_bytes
from tests.helpers.problems import Capture, assert_problem
from training.data import load_directory, normalized_batches
from training.detection.augment import to_model_input
from training.detection.data import load_coco


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width x height`` pixels, with almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def png_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def strict_app(serving_repo: Path):
    """Small limits, and multi-frame images refused."""
    settings = settings_for(
        "embedded",
        serving_repo,
        max_image_pixels=50_000,
        max_body_bytes=300_000,
        max_images_per_request=2,
        multi_frame="reject",
    )
    app = create_app(settings)
    yield app
    app.extensions["imgserve"].close()


def raw(client, data: bytes, content_type: str | None = "image/png", path="/v1/classify", **kw):
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post(path, data=data, headers=headers, **kw)


# -- the bad-input table -----------------------------------------------------------------
BAD_INPUTS = [
    # (case, body, content type, query, expected status, expected problem code)
    ("truncated jpeg", "truncated", "image/jpeg", "", 400, "undecodable_image"),
    ("not an image", b"%PDF-1.4 not an image\n" * 8, "image/png", "", 400, "undecodable_image"),
    ("decompression bomb", png_bomb(), "image/png", "", 413, "image_too_large"),
    ("wrong content type", "png", "text/plain", "", 415, "unsupported_media_type"),
    ("no content type", "png", None, "", 415, "unsupported_media_type"),
    ("empty body", b"", None, "", 400, "bad_request"),
    ("empty image body", b"", "image/png", "", 400, "bad_request"),
    ("malformed json", b"{not json", "application/json", "", 400, "bad_request"),
    ("json without instances", b'{"images": []}', "application/json", "", 400, "bad_request"),
    (
        "json bad base64",
        b'{"instances": [{"b64": "@@@"}]}',
        "application/json",
        "",
        400,
        "bad_request",
    ),
    ("unknown parameter", "png", "image/png", "?topk=3", 400, "invalid_parameter"),
    ("top_k zero", "png", "image/png", "?top_k=0", 400, "invalid_parameter"),
    ("top_k not a number", "png", "image/png", "?top_k=many", 400, "invalid_parameter"),
    ("version and label", "png", "image/png", "?version=1&label=stable", 400, "invalid_parameter"),
    ("score threshold > 1", "png", "image/png", "?score_threshold=2", 400, "invalid_parameter"),
    ("unknown model", "png", "image/png", "?model=nope", 404, "model_not_found"),
    ("unknown version", "png", "image/png", "?version=99", 404, "version_not_found"),
    ("unknown label", "png", "image/png", "?label=canary", 404, "label_not_found"),
    ("task mismatch", "png", "image/png", "?model=tiny_detector", 400, "invalid_parameter"),
]


@pytest.mark.parametrize(
    ("case", "body", "ctype", "query", "status", "code"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_table(client, images, case, body, ctype, query, status, code):
    if body == "truncated":
        body = images["jpeg"][: len(images["jpeg"]) // 2]
    elif body == "png":
        body = images["png"]
    response = client.post(
        "/v1/classify" + query, data=body, headers={"Content-Type": ctype} if ctype else {}
    )
    assert_problem(response, status, code)


@pytest.mark.parametrize(
    "name",
    [
        "grey16_png",
        "cmyk_jpeg",
        "palette_png",
        "palette_transparent_png",
        "rgba_png",
        "grey_png",
        "gif_animated",
        "tiff_multipage",
        "exif_rotated_jpeg",
        "webp",
        "bmp",
        "tiff",
    ],
)
def test_unusual_modes_are_accepted(client, images, name):
    response = client.post(
        "/v1/classify", data=images[name], content_type="application/octet-stream"
    )
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["predictions"]) == 1


def test_limits_of_the_strict_app(strict_app, images):
    client = strict_app.test_client()
    # Pixel count over IMGSERVE_MAX_IMAGE_PIXELS, though the file is small.
    assert_problem(raw(client, png_of(300, 300)), 413, "image_too_large")
    # A bomb past Pillow's own limit quotes the configured limit, not Pillow's.
    doc = assert_problem(raw(client, png_bomb()), 413, "image_too_large")
    assert "50000" in doc["detail"] and "89478485" not in doc["detail"]
    # Body over IMGSERVE_MAX_BODY_BYTES.
    assert_problem(raw(client, b"\x89PNG" + b"\0" * 400_000), 413, "payload_too_large")
    # More images than IMGSERVE_MAX_IMAGES_PER_REQUEST, in each body form.
    small = png_of(20, 20)
    files = {"image": [(io.BytesIO(small), f"{i}.png") for i in range(3)]}
    assert_problem(client.post("/v1/classify", data=files), 413, "too_many_images")
    doc = {"instances": [{"b64": base64.b64encode(small).decode()}] * 3}
    assert_problem(client.post("/v1/classify", json=doc), 413, "too_many_images")
    # Multi-frame images refused when configured: decodable but unusable.
    assert_problem(raw(client, images["gif_animated"], "image/gif"), 422, "unusable_image")
    assert_problem(raw(client, images["tiff_multipage"], "image/tiff"), 422, "unusable_image")


def test_json_numbers_past_float_are_invalid_parameters(client, images):
    # JSON integers have no limit and Python's json keeps them exact: float() of
    # this one overflows (was a 500); as text it reads as inf, refused by range.
    b64 = base64.b64encode(images["png"]).decode()
    huge = "1" + "0" * 400
    for options in (f'"score_threshold": {huge}', f'"top_k": {huge}.5', '"top_k": 1e400'):
        body = f'{{"instances": [{{"b64": "{b64}"}}], {options}}}'
        r = client.post("/v1/classify", data=body, content_type="application/json")
        assert_problem(r, 400, "invalid_parameter")
    r = raw(client, images["png"], query_string={"score_threshold": huge})
    assert_problem(r, 400, "invalid_parameter")


def test_the_failing_image_of_a_batch_is_named(client, images):
    files = {"image": [(io.BytesIO(images["png"]), "a.png"), (io.BytesIO(b"junk"), "b.png")]}
    doc = assert_problem(client.post("/v1/classify", data=files), 400, "undecodable_image")
    assert doc["image_index"] == 1


def test_method_and_route_errors_are_problems(client):
    response = client.get("/v1/classify")
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]
    assert_problem(client.get("/v1/nothing"), 404)


# -- the three body forms ------------------------------------------------------------------
def test_body_forms_give_the_same_answer(client, images):
    data = images["jpeg"]
    a = client.post("/v1/classify?top_k=3", data=data, content_type="image/jpeg").get_json()
    b = client.post(
        "/v1/classify", data={"image": (io.BytesIO(data), "x.jpg"), "top_k": "3"}
    ).get_json()
    c = client.post(
        "/v1/classify",
        json={"instances": [{"b64": base64.b64encode(data).decode()}], "top_k": 3},
    ).get_json()
    d = client.post(
        "/v1/classify?top_k=3",
        data=json.dumps({"instances": [{"image": {"b64": base64.b64encode(data).decode()}}]}),
        content_type="application/json",
    ).get_json()
    assert a["predictions"] == b["predictions"] == c["predictions"] == d["predictions"]
    assert len(a["predictions"][0]["classes"]) == 3


def test_request_id_is_echoed_or_generated(client, images):
    r = client.post(
        "/v1/classify",
        data=images["png"],
        content_type="image/png",
        headers={"X-Request-ID": "client-42"},
    )
    assert r.headers["X-Request-ID"] == "client-42" == r.get_json()["request_id"]
    r = client.post(
        "/v1/classify",
        data=images["png"],
        content_type="image/png",
        headers={"X-Request-ID": "bad id with spaces"},
    )
    assert r.headers["X-Request-ID"] != "bad id with spaces"
    assert len(r.headers["X-Request-ID"]) == 32


# -- parity: the training input path and the gateway give identical tensors -----------------
@pytest.mark.parametrize("model", ["tiny_classifier", "tiny_detector"])
def test_preprocessing_parity_with_the_training_input_path(embedded_app, images, tmp_path, model):
    """Every decode path (JPEG, PNG, grey, palette, RGBA, 16-bit, CMYK, EXIF, multi-frame ...),
    and photo-sized inputs (12 MP EXIF-rotated JPEG, 1920x1080 PNG, 16-bit TIFF).

    Training path of the classifier: files in class folders -> ``training.data.load_directory``
    -> ``normalized_batches``; of the detector: a COCO set -> ``decode_usable(spec)`` -> the
    input pipeline's ``to_model_input``. Gateway path: the same bytes over HTTP; the tensor
    the model received is captured by a prediction observer. The classifier is a fresh
    export (photo-sized decoding on); the detector's card predates the field (full decode).
    """
    service = embedded_app.extensions["imgserve"]
    card = service.describe_model(model)["versions"][0]["model_card"]
    spec = PreprocessSpec.from_dict(card["preprocessing"])
    assert spec.decode_oversample == (2.0 if model == "tiny_classifier" else None)
    images = {**images, **photo_sized_image_bytes()}
    if model == "tiny_classifier":
        expected = _classifier_training_inputs(images, spec, tmp_path / "data")
    else:
        expected = _detector_training_inputs(images, spec, tmp_path / "coco")
    capture = Capture()
    service.add_observer(capture)
    client = embedded_app.test_client()
    endpoint = "/v1/classify" if model == "tiny_classifier" else "/v1/detect"
    try:
        for name, data in images.items():
            response = client.post(
                f"{endpoint}?model={model}", data=data, content_type="application/octet-stream"
            )
            assert response.status_code == 200, (name, response.get_json())
            served = capture.events[-1].inputs[0]
            train = expected[name]
            assert served.dtype == train.dtype == np.float32
            assert np.array_equal(served, train), f"{name}: gateway and training tensors differ"
    finally:
        service.remove_observer(capture)
    assert len(capture.events) == len(images)


def _classifier_training_inputs(
    images: dict[str, bytes], spec: PreprocessSpec, root: Path
) -> dict[str, np.ndarray]:
    for name, data in images.items():
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{name}.{_ext(data)}").write_bytes(data)
    (root / "b").mkdir()
    (root / "b" / "extra.png").write_bytes(images["png"])
    training_set = load_directory(root, spec)
    assert not training_set.skipped
    tensors = dict(
        zip(
            training_set.keys, next(normalized_batches(training_set.pixels, spec, 100)), strict=True
        )
    )
    return {name: tensors[f"a/{name}.{_ext(data)}"] for name, data in images.items()}


def _detector_training_inputs(
    images: dict[str, bytes], spec: PreprocessSpec, root: Path
) -> dict[str, np.ndarray]:
    dataset, decoded = load_coco(write_photo_coco(root, images)).decode_usable(spec)
    assert not dataset.skipped
    return {
        name: to_model_input(image, sample.boxes, spec)[0]
        for name, image, sample in zip(images, decoded, dataset.samples, strict=True)
    }


def _ext(data: bytes) -> str:
    return Image.open(io.BytesIO(data)).format.lower()


def test_exif_rotation_is_applied_before_mapping_boxes(client):
    data, upright = exif_rotated_jpeg()
    body = client.post("/v1/detect", data=data, content_type="image/jpeg").get_json()
    prediction = body["predictions"][0]
    # The stored JPEG is sideways; the answer describes the upright image.
    assert (prediction["height"], prediction["width"]) == upright.shape[:2]
    for det in prediction["detections"]:
        box = det["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= upright.shape[1]
        assert 0 <= box["ymin"] <= box["ymax"] <= upright.shape[0]


# -- the adversarial image corpus ----------------------------------------------------------
def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose screen and image descriptor declare ``width x height``, with one pixel of data."""
    size = struct.pack("<HH", width, height)
    return (
        b"GIF89a" + size + b"\x00\x00\x00" + b",\x00\x00\x00\x00" + size + b"\x00\x02\x02D\x01\x00;"
    )


def adversarial_corpus() -> list[tuple[str, bytes, int, str | None]]:
    """(case, body, status, problem code) from scikit-image's bundled photographs."""
    from skimage import data

    astro, camera = Image.fromarray(data.astronaut()), Image.fromarray(data.camera())
    jpeg, png = _encoded(astro, "JPEG"), _encoded(astro, "PNG")
    wide = np.asarray(camera).astype(np.uint16) * 257
    return [
        ("jpeg cut at 10%", jpeg[: len(jpeg) // 10], 400, "undecodable_image"),
        ("jpeg cut at 95%", jpeg[: len(jpeg) * 95 // 100], 400, "undecodable_image"),
        ("png cut at 50%", png[: len(png) // 2], 400, "undecodable_image"),
        ("png signature and IHDR only", png[:33], 400, "undecodable_image"),
        ("png bomb 100000x100000", png_bomb(), 413, "image_too_large"),
        ("png header 6400x6400 (41 MP)", png_bomb(6400, 6400), 413, "image_too_large"),
        ("gif declaring 65535x65535", _gif_declaring(65535, 65535), 413, "image_too_large"),
        ("cmyk jpeg", _encoded(astro.convert("CMYK"), "JPEG"), 200, None),
        ("16-bit grey png", _encoded(Image.fromarray(wide), "PNG"), 200, None),
        ("1-bit png", _encoded(camera.convert("1"), "PNG"), 200, None),
        (
            "palette png with transparency",
            _encoded(astro.convert("P"), "PNG", transparency=0),
            200,
            None,
        ),
        ("grey+alpha png", _encoded(camera.convert("LA"), "PNG"), 200, None),
        (
            "float32 tiff",
            _encoded(Image.fromarray(np.asarray(camera, np.float32) / 255), "TIFF"),
            200,
            None,
        ),
        ("16-bit tiff", _encoded(Image.fromarray(wide), "TIFF"), 200, None),
    ]


ADVERSARIAL = adversarial_corpus()


@pytest.mark.parametrize(
    ("case", "body", "status", "code"), ADVERSARIAL, ids=[c[0] for c in ADVERSARIAL]
)
def test_adversarial_image_corpus(client, case, body, status, code):
    t0 = time.monotonic()
    r = raw(client, body, "application/octet-stream")
    if status == 200:
        assert r.status_code == 200, r.get_json()
        assert len(r.get_json()["predictions"]) == 1
    else:
        assert_problem(r, status, code)
        # Refused from the header or the first broken bytes, never after a long decode.
        assert time.monotonic() - t0 < 2.0


def test_a_flood_of_large_dimension_headers_is_refused_at_the_first(strict_app):
    # 2 images (the strict limit) declaring 6000x6000 each: 413 from the header alone.
    flood = png_bomb(6000, 6000)
    files = {"image": [(io.BytesIO(flood), f"{i}.png") for i in range(2)]}
    t0 = time.monotonic()
    doc = assert_problem(strict_app.test_client().post("/v1/classify", data=files), 413)
    assert doc["code"] == "image_too_large" and doc["image_index"] == 0
    assert time.monotonic() - t0 < 2.0
