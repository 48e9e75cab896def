"""TF Serving's REST API at the gateway, under gunicorn, cross-checked against the stand-in.

Requests are written as TF Serving's documentation writes them (``curl -d`` bodies,
which arrive as form-encoded, and ``requests`` JSON), row and columnar, with
versions and labels. The gateway decodes and preprocesses ``b64`` image files; the
stand-in (TF Serving's protocol over the same SavedModels) is sent the tensor that
preprocessing gives, so both answer the same model call and must agree in shape
and value.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import requests

from contract.model_card import read_model_card
from contract.preprocessing import preprocess_bytes
from tests.helpers import metrics_text, servers, tiny_models
from tests.helpers.photos import sample_image_bytes
from tests.helpers.tfserving_standin import TFServingStandIn

pytestmark = pytest.mark.slow

CLS, DET = tiny_models.CLASSIFIER, tiny_models.DETECTOR
PROBLEM = "application/problem+json"
CLASSIFIER_OUTPUTS = {"bn_input_mean", "bn_input_sqmean", "logits", "probabilities"}
DETECTOR_OUTPUTS = {
    "bn_input_mean",
    "bn_input_sqmean",
    "detection_boxes",
    "detection_classes",
    "detection_scores",
    "num_detections",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_models.build_repository(tmp_path_factory.mktemp("tfserving_rest_models"))


@pytest.fixture(scope="module")
def gateway(repo, tmp_path_factory):
    """The gateway under gunicorn (one worker, embedded backend) on loopback."""
    tmp = tmp_path_factory.mktemp("tfserving_rest_gateway")
    proc, url, log = servers.gunicorn(repo, tmp, workers="1", threads="4")
    yield url
    assert servers.stop(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def standin(repo):
    server = TFServingStandIn(repo).start()
    yield server.rest_url
    server.stop()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    images = sample_image_bytes()
    return {"cat": images["jpeg"], "gray": images["grey_png"]}


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def curl_post(url: str, body: dict) -> requests.Response:
    """``curl -d '<json>' -X POST url``: curl sends the form content type, TF Serving ignores it."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return requests.post(url, data=json.dumps(body), headers=headers, timeout=30)


def model_input(repo, name: str, data: bytes) -> list:
    """The tensor the gateway feeds the model for ``data`` (the card's preprocessing)."""
    card = read_model_card(repo / name / "1")
    return preprocess_bytes(data, card.preprocess_spec)[0].tolist()


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol)


# -- :predict ------------------------------------------------------------------------------
def test_row_predict_gives_every_output_and_classify_probabilities(gateway, photos):
    images = [photos["cat"], photos["gray"]]
    r = curl_post(f"{gateway}/v1/models/{CLS}:predict", {"instances": [b64(i) for i in images]})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == 2
    ours = requests.post(
        f"{gateway}/v1/classify",
        json={"instances": [b64(i) for i in images], "model": CLS, "top_k": 3},
        timeout=30,
    ).json()["predictions"]
    labels = tiny_models.CLASSIFIER_LABELS
    for row, classified in zip(predictions, ours, strict=True):
        assert set(row) == CLASSIFIER_OUTPUTS
        probs = np.asarray(row["probabilities"])
        assert probs.shape == (len(labels),)
        by_label = {c["label"]: c["score"] for c in classified["classes"]}
        assert_close(probs, [by_label[label] for label in labels], atol=1e-6)
        assert labels[int(np.argmax(probs))] == classified["classes"][0]["label"]
        logits = np.asarray(row["logits"])
        assert_close(np.exp(logits) / np.exp(logits).sum(), probs)


def test_columnar_named_input_by_version_equals_row_by_label(gateway, photos):
    images = [b64(photos["cat"]), b64(photos["gray"])]
    columnar = requests.post(
        f"{gateway}/v1/models/{CLS}/versions/1:predict",
        json={"signature_name": "serving_default", "inputs": {"images": images}},
        timeout=30,
    )
    assert columnar.status_code == 200, columnar.text
    outputs = columnar.json()["outputs"]
    assert set(outputs) == CLASSIFIER_OUTPUTS
    row = requests.post(
        f"{gateway}/v1/models/{CLS}/labels/stable:predict",
        json={"instances": [{"images": image} for image in images]},
        timeout=30,
    ).json()["predictions"]
    for name in CLASSIFIER_OUTPUTS:
        assert_close(outputs[name], [r[name] for r in row], atol=1e-6)


@pytest.mark.parametrize("fmt", ["instances", "inputs"])
@pytest.mark.parametrize("name", [CLS, DET])
def test_predict_answers_as_tf_serving_does_for_the_same_model_input(
    gateway, standin, repo, photos, name, fmt
):
    data = [photos["cat"], photos["gray"]]
    ours = curl_post(
        f"{gateway}/v1/models/{name}/versions/1:predict", {fmt: [b64(d) for d in data]}
    )
    tensors = [model_input(repo, name, d) for d in data]
    theirs = curl_post(f"{standin}/v1/models/{name}/versions/1:predict", {fmt: tensors})
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text[:300])
    key = "predictions" if fmt == "instances" else "outputs"
    assert set(ours.json()) == set(theirs.json()) == {key}
    ours_doc, theirs_doc = ours.json()[key], theirs.json()[key]
    if fmt == "instances":
        ours_doc = {k: [row[k] for row in ours_doc] for k in ours_doc[0]}
        theirs_doc = {k: [row[k] for row in theirs_doc] for k in theirs_doc[0]}
    assert (
        set(ours_doc)
        == set(theirs_doc)
        == (CLASSIFIER_OUTPUTS if name == CLS else DETECTOR_OUTPUTS)
    )
    for output, value in theirs_doc.items():
        assert np.shape(ours_doc[output]) == np.shape(value), output
        assert_close(ours_doc[output], value, atol=1e-4)


def test_detector_predict_gives_the_detection_tensors(gateway, photos):
    r = curl_post(f"{gateway}/v1/models/{DET}:predict", {"instances": [b64(photos["cat"])]})
    assert r.status_code == 200, r.text
    (row,) = r.json()["predictions"]
    assert_close(row["detection_boxes"], tiny_models.DETECTOR_BOXES)
    assert_close(row["detection_scores"], [s for _, s in tiny_models.DETECTOR_SLOTS])
    assert_close(row["detection_classes"], [c for c, _ in tiny_models.DETECTOR_SLOTS])
    assert row["num_detections"] == len(tiny_models.DETECTOR_SLOTS)


# -- :classify -----------------------------------------------------------------------------
def test_classify_gives_every_class_best_first_as_v1_classify(gateway, photos):
    images = [photos["cat"], photos["gray"]]
    r = curl_post(
        f"{gateway}/v1/models/{CLS}/labels/stable:classify",
        {"signature_name": "serving_default", "examples": [{"image": b64(i)} for i in images]},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    ours = requests.post(
        f"{gateway}/v1/classify?model={CLS}&top_k=3",
        files=[("image", i) for i in images],
        timeout=30,
    ).json()["predictions"]
    assert len(results) == len(ours) == 2
    for pairs, classified in zip(results, ours, strict=True):
        assert [label for label, _ in pairs] == [c["label"] for c in classified["classes"]]
        assert_close([s for _, s in pairs], [c["score"] for c in classified["classes"]], 1e-6)
        scores = [s for _, s in pairs]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5


# -- model status and metadata ---------------------------------------------------------------
@pytest.mark.parametrize("where", ["", "/versions/1", "/labels/stable"])
def test_model_status_adds_tf_servings_model_version_status(gateway, standin, where):
    ours = requests.get(f"{gateway}/v1/models/{CLS}{where}", timeout=30)
    theirs = requests.get(f"{standin}/v1/models/{CLS}{where}", timeout=30)
    assert ours.status_code == theirs.status_code == 200
    doc = ours.json()
    assert doc["model_version_status"] == theirs.json()["model_version_status"]
    assert doc["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]
    # What the route returned before stays: the model, its labels, the cards.
    assert doc["name"] == CLS and doc["version_labels"] == {"stable": 1}
    assert doc["versions"][0]["model_card"]["name"] == CLS


@pytest.mark.parametrize("name", [CLS, DET])
@pytest.mark.parametrize("where", ["", "/versions/1", "/labels/stable"])
def test_metadata_is_tf_servings(gateway, standin, name, where):
    ours = requests.get(f"{gateway}/v1/models/{name}{where}/metadata", timeout=30)
    theirs = requests.get(f"{standin}/v1/models/{name}{where}/metadata", timeout=30)
    assert ours.status_code == theirs.status_code == 200, ours.text
    assert ours.json() == theirs.json()
    sig = ours.json()["metadata"]["signature_def"]["signature_def"]["serving_default"]
    spec = tiny_models.CLASSIFIER_SPEC if name == CLS else tiny_models.DETECTOR_SPEC
    images = sig["inputs"]["images"]
    assert images["dtype"] == "DT_FLOAT"
    dims = [d["size"] for d in images["tensor_shape"]["dim"]]
    assert dims == ["-1", str(spec.height), str(spec.width), "3"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert ours.json()["model_spec"] == {"name": name, "signature_name": "", "version": "1"}


# -- errors --------------------------------------------------------------------------------
CAT = b64(sample_image_bytes()["jpeg"])
ERRORS = [
    # (path, body, status, also asked of the stand-in)
    ("/v1/models/nope:predict", {"instances": [CAT]}, 404, True),
    (f"/v1/models/{CLS}/versions/9:predict", {"instances": [CAT]}, 404, True),
    # TF Serving: an unknown label is INVALID_ARGUMENT ("Unrecognized servable version label").
    (f"/v1/models/{CLS}/labels/nope:predict", {"instances": [CAT]}, 400, True),
    (f"/v1/models/{CLS}:predict", {"signature_name": "other", "instances": [CAT]}, 400, True),
    (f"/v1/models/{CLS}:predict", {"instances": [{"b64": "not base64!"}]}, 400, False),
    (f"/v1/models/{CLS}:predict", {"instances": []}, 400, False),
    (f"/v1/models/{CLS}:predict", {"instances": [CAT], "inputs": [CAT]}, 400, True),
    (f"/v1/models/{CLS}:predict", {}, 400, True),
    (
        f"/v1/models/{CLS}:predict",
        {"instances": [{"b64": base64.b64encode(b"no image").decode()}]},
        400,
        False,
    ),
    (f"/v1/models/{CLS}:classify", {"examples": []}, 400, False),
    (f"/v1/models/{CLS}:classify", {"examples": [{"picture": CAT}]}, 400, False),
    (f"/v1/models/{DET}:classify", {"examples": [{"image": CAT}]}, 400, False),
    (f"/v1/models/{CLS}/versions/9", None, 404, True),
    (f"/v1/models/{CLS}/labels/nope", None, 400, True),
    (f"/v1/models/{CLS}/versions/9/metadata", None, 404, True),
    ("/v1/models/nope", None, 404, True),
]


@pytest.mark.parametrize(("path", "body", "status", "cross_check"), ERRORS)
def test_errors_carry_tf_servings_error_member_and_status(
    gateway, standin, path, body, status, cross_check
):
    def call(base):
        if body is None:
            return requests.get(base + path, timeout=30)
        return curl_post(base + path, body)

    r = call(gateway)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == PROBLEM
    doc = r.json()
    assert isinstance(doc["error"], str) and doc["error"] == doc["detail"]
    assert doc["status"] == status and "Traceback" not in r.text
    if cross_check:
        theirs = call(standin)
        assert theirs.status_code == status, theirs.text
        assert isinstance(theirs.json()["error"], str)


def test_malformed_json_is_400_with_an_error(gateway):
    r = requests.post(f"{gateway}/v1/models/{CLS}:predict", data=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_bare_model_url_allows_get_only_and_predict_url_post_only(gateway):
    r = requests.post(f"{gateway}/v1/models/{CLS}", json={"instances": [CAT]}, timeout=30)
    assert r.status_code == 405
    assert "GET" in r.headers["Allow"] and "POST" not in r.headers["Allow"]
    r = requests.get(f"{gateway}/v1/models/{CLS}:predict", timeout=30)
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    assert requests.get(f"{gateway}/v1/models/{CLS}", timeout=30).status_code == 200


def test_predict_is_counted_like_v1_classify(gateway, photos):
    def scrape():
        return metrics_text.parse(requests.get(f"{gateway}/metrics", timeout=30).text)

    before = scrape()
    r = curl_post(f"{gateway}/v1/models/{CLS}:predict", {"instances": [b64(photos["cat"])] * 3})
    assert r.status_code == 200
    after = scrape()
    images = "imgserve_images_total"
    assert (
        metrics_text.value(after, images, model=CLS) - metrics_text.value(before, images, model=CLS)
        == 3
    )
    requests_total = "imgserve_requests_total"
    endpoint = "/v1/models/<model:name>:predict"
    assert (
        metrics_text.value(after, requests_total, endpoint=endpoint, model=CLS, code="200")
        - metrics_text.value(before, requests_total, endpoint=endpoint, model=CLS, code="200")
        == 1
    )
