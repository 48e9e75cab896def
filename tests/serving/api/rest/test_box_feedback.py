"""Box feedback on ``POST /v1/feedback`` through real gunicorn, with the kept demo detector.

A coloured rectangle is drawn on a photograph stored sideways with an EXIF
orientation tag; after a captured detect request, the rectangle's box in the
upright original's pixels is posted as feedback, and the capture store's model
input must show the rectangle's colour inside the recorded ``input_box``, for
the detector's letterbox card (version 1) and a stretch variant (version 2).
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from calibration.samples import iter_samples
from contract.model_card import MODEL_CARD_RELPATH
from contract.repository import ModelRepository
from tests.helpers.capture_store import wait_captured
from tests.helpers.photos import photo
from tests.helpers.servers import ROOT, gunicorn, stop

DETECTOR = "demo_detector"
CLASSIFIER = "demo_classifier"
#: The rectangle, (ymin, xmin, ymax, xmax) in the upright photo's pixels (chelsea: 451x300).
RECT = (90, 140, 230, 360)
COLOUR = (0, 255, 0)
#: version -> preprocessing geometry of its card.
GEOMETRY = {1: "letterbox", 2: "stretch"}


def _marked_photo() -> Image.Image:
    img = photo("chelsea.png").convert("RGB")
    px = np.asarray(img).copy()
    y0, x0, y1, x1 = RECT
    px[y0:y1, x0:x1] = COLOUR
    return Image.fromarray(px)


def _sideways_jpeg(orientation: int) -> bytes:
    """The marked photo stored turned, with the EXIF tag that turns it upright again.

    Orientation 6 displays the stored pixels turned 90° clockwise, 8 counter-clockwise.
    """
    turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    _marked_photo().transpose(turn).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """gunicorn over the demo detector (v1 letterbox, v2 its stretch variant) and the
    demo classifier, capturing every request: (base URL, capture directory)."""
    tmp = tmp_path_factory.mktemp("box_feedback")
    base = tmp / "models"
    shutil.copytree(ROOT / "models" / CLASSIFIER / "1", base / CLASSIFIER / "1")
    shutil.copytree(ROOT / "models" / DETECTOR / "1", base / DETECTOR / "1")
    shutil.copytree(ROOT / "models" / DETECTOR / "1", base / DETECTOR / "2")
    card_path = base / DETECTOR / "2" / MODEL_CARD_RELPATH
    card = json.loads(card_path.read_text())
    assert card["preprocessing"]["geometry"] == GEOMETRY[1]
    card["version"] = 2
    card["preprocessing"]["geometry"] = GEOMETRY[2]
    card_path.write_text(json.dumps(card, indent=2))
    repo = ModelRepository(base)
    repo.set_labels(CLASSIFIER, {"stable": 1})
    repo.set_labels(DETECTOR, {"stable": 1, "canary": 2})
    capture = tmp / "samples"
    proc, url, log = gunicorn(
        base, tmp, workers="1", threads="4", capture_dir=str(capture), capture_rate="1"
    )
    try:
        yield url, capture
    finally:
        stop(proc)


def _detect(url: str, data: bytes, request_id: str, version: int = 1) -> dict:
    r = requests.post(
        f"{url}/v1/detect?model={DETECTOR}&version={version}",
        data=data,
        headers={"Content-Type": "image/jpeg", "X-Request-ID": request_id},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _classify(url: str, data: bytes, request_id: str) -> None:
    r = requests.post(
        f"{url}/v1/classify?model={CLASSIFIER}",
        data=data,
        headers={"Content-Type": "image/jpeg", "X-Request-ID": request_id},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def _feedback(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/v1/feedback", json=body, timeout=30)


def _problem(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["status"] == status and doc["code"] == code and doc["detail"], doc
    return doc


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize("version", sorted(GEOMETRY))
def test_a_box_in_original_pixels_lands_on_the_object_in_the_captured_input(
    gateway, version, orientation
):
    url, capture = gateway
    request_id = f"rect-v{version}-o{orientation}"
    detected = _detect(url, _sideways_jpeg(orientation), request_id, version)
    (image,) = detected["predictions"]
    assert (image["width"], image["height"]) == (451, 300)  # upright: EXIF applied
    wait_captured(capture, request_id)
    body = {
        "request_id": request_id,
        "model": DETECTOR,
        "objects": [[{"label": "square", "box": list(RECT)}]],
    }
    r = _feedback(url, body)
    assert r.status_code == 201, r.text
    (obj,) = r.json()["objects"][0]
    assert obj["label"] == "square" and obj["box"] == list(RECT)

    (sample,) = [s for s in iter_samples(capture, DETECTOR) if s.request_id == request_id]
    assert sample.version == version
    (box,) = sample.objects
    assert box.label == "square" and box.box == pytest.approx(obj["input_box"])
    x = sample.input  # normalised to [-1, 1]: the rectangle is (-1, 1, -1)
    h, w = x.shape[:2]
    y0, x0, y1, x1 = box.box
    assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    if GEOMETRY[version] == "stretch":  # the whole photo fills the input
        assert (x0, x1) == pytest.approx((RECT[1] * w / 451, RECT[3] * w / 451))
    else:  # letterbox: the photo's 451 columns fill the width, rows are padded
        assert (y0 - RECT[0] * w / 451) > 10
    # Inside the box (one pixel in from each edge): the rectangle's colour.
    inner = x[int(np.ceil(y0)) + 1 : int(y1) - 1, int(np.ceil(x0)) + 1 : int(x1) - 1]
    assert inner.size > 100
    green = (inner[..., 1] > 0.6) & (inner[..., 0] < -0.6) & (inner[..., 2] < -0.6)
    assert green.mean() > 0.99, green.mean()
    # Around it (2 to 4 pixels out): the photo, not the rectangle. A box that was
    # mirrored, turned or scaled wrongly fails one of the two checks.
    ring = np.zeros(x.shape[:2], bool)
    ring[max(int(y0) - 4, 0) : int(y1) + 4, max(int(x0) - 4, 0) : int(x1) + 4] = True
    ring[int(y0) - 1 : int(np.ceil(y1)) + 1, int(x0) - 1 : int(np.ceil(x1)) + 1] = False
    around = x[ring]
    outside = (around[:, 1] > 0.6) & (around[:, 0] < -0.6) & (around[:, 2] < -0.6)
    assert outside.mean() < 0.1, outside.mean()
    # The same objects again: 200, nothing rewritten.
    again = _feedback(url, body)
    assert again.status_code == 200 and again.json()["created"] is False


def test_box_feedback_validation_through_the_gateway(gateway):
    url, capture = gateway
    jpeg = _sideways_jpeg(6)  # upright: 451 wide, 300 high
    _detect(url, jpeg, "check")
    _classify(url, jpeg, "classified")
    wait_captured(capture, "check")
    wait_captured(capture, "classified")

    def post(objects, request_id="check", **extra):
        return _feedback(url, {"request_id": request_id, "objects": objects, **extra})

    box = [10, 20, 100, 200]
    ok = {"label": "circle", "box": box}
    cases = [
        ("not 4 numbers", [[{"label": "circle", "box": [1, 2, 3]}]], "4 finite numbers"),
        ("a string", [[{"label": "circle", "box": [1, 2, 3, "4"]}]], "4 finite numbers"),
        ("ymin >= ymax", [[{"label": "circle", "box": [100, 20, 10, 200]}]], "empty"),
        ("xmin >= xmax", [[{"label": "circle", "box": [10, 200, 100, 200]}]], "empty"),
        ("below", [[{"label": "circle", "box": [10, 20, 300.6, 200]}]], "outside"),
        ("right", [[{"label": "circle", "box": [10, 20, 100, 452]}]], "outside"),
        ("unknown label", [[{"label": "hexagon", "box": box}]], "unknown label"),
        ("index out of range", [[{"label": 4, "box": box}]], "out of range"),
        ("no label", [[{"box": box}]], "'label' and 'box'"),
        ("two lists, one image", [[ok], [ok]], "1 image"),
        ("not per image", [ok], "must be a list"),
        ("empty", [], "one list of objects per image"),
    ]
    for what, objects, detail in cases:
        doc = _problem(post(objects), 422, "unprocessable")
        assert detail in doc["detail"], (what, doc["detail"])
    doc = _problem(post([[ok]], request_id="classified"), 422, "unprocessable")
    assert "classification" in doc["detail"]
    _problem(post([[ok]], request_id="never-captured"), 404, "not_found")
    both = _feedback(url, {"request_id": "check", "labels": ["circle"], "objects": [[ok]]})
    assert "not both" in _problem(both, 400, "bad_request")["detail"]
    _problem(_feedback(url, {"request_id": "check"}), 400, "bad_request")
    _problem(post([[ok]], model="no-such-model"), 404, "model_not_found")

    # Half a pixel past the border is clipped; an index label is stored as its name.
    edge = post([[{"label": 1, "box": [-0.5, 0, 300.5, 451.4]}]])
    assert edge.status_code == 201, edge.text
    assert edge.json()["objects"] == [
        [
            {
                "label": "square",
                "box": [0.0, 0.0, 300.0, 451.0],
                "input_box": pytest.approx(edge.json()["objects"][0][0]["input_box"]),
            }
        ]
    ]
    same = post([[{"label": "square", "box": [-0.5, 0, 300.5, 451.4]}]])
    assert same.status_code == 200 and same.json()["created"] is False
    _problem(post([[{"label": "circle", "box": [0, 0, 300, 451]}]]), 409, "conflict")
    _problem(_feedback(url, {"request_id": "check", "labels": ["circle"]}), 409, "conflict")
    # A detection copied from a response (box as an object, score and index) is taken.
    _detect(url, jpeg, "copied")
    wait_captured(capture, "copied")
    detection = {
        "label": "cross",
        "index": 3,
        "score": 0.4,
        "box": dict(zip(("ymin", "xmin", "ymax", "xmax"), box, strict=True)),
    }
    copied = post([[detection]], request_id="copied")
    assert copied.status_code == 201, copied.text
    assert [(o["label"], o["box"]) for o in copied.json()["objects"][0]] == [("cross", box)]
    # A tensor request (the Open Inference Protocol's preprocessed ``input``): no
    # geometry, so no boxes.
    shape = [1, 128, 128, 3]
    tensor = requests.post(
        f"{url}/v2/models/{DETECTOR}/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": shape,
                    "data": [0.0] * (128 * 128 * 3),
                }
            ]
        },
        headers={"X-Request-ID": "tensor"},
        timeout=60,
    )
    assert tensor.status_code == 200, tensor.text
    wait_captured(capture, "tensor")
    doc = _problem(post([[ok]], request_id="tensor"), 422, "unprocessable")
    assert "without image geometry" in doc["detail"]
    # Image labels on a detect request keep working.
    _detect(url, jpeg, "labels-only")
    wait_captured(capture, "labels-only")
    labelled = _feedback(url, {"request_id": "labels-only", "labels": ["circle"]})
    assert labelled.status_code == 201, labelled.text
