"""One behavioural suite for the three backends, then each backend's failure modes.

The TF Serving backends talk to the stand-in (``tfserving_standin.py``) over real
gRPC and HTTP on loopback; the stand-in serves the same SavedModels.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf

from contract.preprocessing import PreprocessSpec, preprocess_bytes
from contract.repository import ModelRepository
from serving.app import create_app
from tests.helpers import tiny_models
from tests.helpers.gateway import settings_for
from tests.helpers.problems import Capture, assert_problem
from tests.helpers.servers import free_port, wait_for
from tests.helpers.tfserving_standin import TFServingStandIn

REMOTE = ("tfserving-grpc", "tfserving-rest")


def reference_outputs(repo: Path, name: str, data: bytes) -> dict[str, np.ndarray]:
    """The SavedModel run directly on ``preprocess_bytes`` of the image."""
    card = tiny_models_card(repo, name)
    x, _ = preprocess_bytes(data, PreprocessSpec.from_dict(card["preprocessing"]))
    model = tf.saved_model.load(str(repo / name / "1"))
    out = model.signatures["serving_default"](images=tf.constant(x[None]))
    return {k: v.numpy() for k, v in out.items()}


def tiny_models_card(repo: Path, name: str) -> dict:
    from contract.model_card import load_model_card

    return load_model_card(repo / name / "1")


# -- the shared behaviour -------------------------------------------------------------------
def test_classify_matches_the_saved_model(backend_app, serving_repo, images):
    client = backend_app.test_client()
    response = client.post("/v1/classify?top_k=2", data=images["png"], content_type="image/png")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["model"] == {"name": "tiny_classifier", "version": 1, "labels": ["stable"]}
    classes = body["predictions"][0]["classes"]
    assert len(classes) == 2 and classes[0]["score"] >= classes[1]["score"]
    probs = reference_outputs(serving_repo, "tiny_classifier", images["png"])["probabilities"][0]
    card = tiny_models_card(serving_repo, "tiny_classifier")
    order = np.argsort(-probs)[:2]
    assert [c["label"] for c in classes] == [card["labels"][i] for i in order]
    np.testing.assert_allclose([c["score"] for c in classes], probs[order], rtol=1e-5, atol=1e-6)


def test_the_trained_classifier_recognises_its_photographs(backend_app, serving_repo, tmp_path):
    """Crops like the project's tiny classifier was trained on: the gateway's answers are
    the model's own on the training input path, and better than chance."""
    from tests.helpers.photos import write_photo_crops
    from training.data import load_directory, normalized_batches

    root = write_photo_crops(tmp_path, 6, seed=123)
    card = tiny_models_card(serving_repo, "tiny_classifier")
    data = load_directory(root, PreprocessSpec.from_dict(card["preprocessing"]))
    model = tf.saved_model.load(str(serving_repo / "tiny_classifier" / "1"))
    x = next(normalized_batches(data.pixels, PreprocessSpec.from_dict(card["preprocessing"]), 100))
    probs = model.signatures["serving_default"](images=tf.constant(x))["probabilities"].numpy()
    expected = [card["labels"][i] for i in probs.argmax(1)]
    files = {"image": [(io.BytesIO((root / key).read_bytes()), key) for key in data.keys[:16]]}
    files2 = {"image": [(io.BytesIO((root / key).read_bytes()), key) for key in data.keys[16:]]}
    client = backend_app.test_client()
    served = []
    for f in (files, files2):
        body = client.post("/v1/classify?top_k=1", data=f).get_json()
        served += [p["classes"][0]["label"] for p in body["predictions"]]
    assert served == expected
    truth = [data.class_names[i] for i in data.labels]
    accuracy = np.mean([a == b for a, b in zip(served, truth, strict=True)])
    assert accuracy > 0.5, f"accuracy {accuracy:.2f} (chance is 0.33)"


def test_detect_maps_boxes_to_original_pixels(backend_app, images):
    from PIL import Image

    client = backend_app.test_client()
    response = client.post("/v1/detect", data=images["png"], content_type="image/png")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["model"]["name"] == "tiny_detector"
    width, height = Image.open(io.BytesIO(images["png"])).size
    prediction = body["predictions"][0]
    assert (prediction["width"], prediction["height"]) == (width, height)
    # Default threshold 0.3 keeps slots 0 (0.9) and 1 (0.6), best first.
    dets = prediction["detections"]
    assert [d["label"] for d in dets] == ["triangle", "circle"]
    assert dets[0]["score"] == pytest.approx(0.9, abs=1e-5)
    # Undo the letterbox independently of the gateway: scale to fit 40x40, centred.
    s = min(40 / height, 40 / width)
    nh, nw = round(height * s), round(width * s)
    top, left = (40 - nh) // 2, (40 - nw) // 2
    ymin, xmin, ymax, xmax = tiny_models.DETECTOR_BOXES[0]
    expected = [
        np.clip((ymin * 40 - top) / (nh / height), 0, height),
        np.clip((xmin * 40 - left) / (nw / width), 0, width),
        np.clip((ymax * 40 - top) / (nh / height), 0, height),
        np.clip((xmax * 40 - left) / (nw / width), 0, width),
    ]
    box = dets[0]["box"]
    np.testing.assert_allclose(
        [box["ymin"], box["xmin"], box["ymax"], box["xmax"]], expected, atol=1e-3
    )
    # Options: a lower threshold and a cap.
    body = client.post(
        "/v1/detect?score_threshold=0.1&max_detections=2",
        data=images["png"],
        content_type="image/png",
    ).get_json()
    assert [d["score"] > 0.1 for d in body["predictions"][0]["detections"]] == [True, True]


def test_several_images_answer_in_order(backend_app, images):
    client = backend_app.test_client()
    names = ["png", "grey_png", "jpeg"]
    files = {"image": [(io.BytesIO(images[n]), f"{n}") for n in names]}
    batch = client.post("/v1/classify?top_k=3", data=files).get_json()["predictions"]
    singles = [
        client.post("/v1/classify?top_k=3", data=images[n], content_type="image/png").get_json()[
            "predictions"
        ][0]
        for n in names
    ]
    # Same labels and order; scores equal up to float rounding (oneDNN kernels differ by batch size).
    for b, s in zip(batch, singles, strict=True):
        assert [c["label"] for c in b["classes"]] == [c["label"] for c in s["classes"]]
        np.testing.assert_allclose(
            [c["score"] for c in b["classes"]], [c["score"] for c in s["classes"]], atol=1e-5
        )


def test_version_and_label_selection(backend_app, images):
    client = backend_app.test_client()
    png = images["png"]
    for query in ("?version=1", "?label=stable", "?model=tiny_classifier&label=stable"):
        r = client.post("/v1/classify" + query, data=png, content_type="image/png")
        assert r.status_code == 200 and r.get_json()["model"]["version"] == 1
    assert_problem(client.post("/v1/classify?version=5", data=png, content_type="image/png"), 404)
    assert_problem(
        client.post("/v1/classify?label=canary", data=png, content_type="image/png"), 404
    )
    assert_problem(client.post("/v1/detect?model=nope", data=png, content_type="image/png"), 404)


def test_models_and_readiness(backend_app):
    client = backend_app.test_client()
    models = {m["name"]: m for m in client.get("/v1/models").get_json()["models"]}
    assert set(models) == {"tiny_classifier", "tiny_detector"}
    assert models["tiny_detector"]["task"] == "detection"
    assert models["tiny_detector"]["class_labels"] == tiny_models.DETECTOR_LABELS
    assert models["tiny_classifier"]["versions"] == [
        {"version": 1, "state": "AVAILABLE", "labels": ["stable"]}
    ]
    detail = client.get("/v1/models/tiny_detector").get_json()
    assert detail["versions"][0]["model_card"]["name"] == "tiny_detector"
    assert detail["version_labels"] == {"stable": 1}
    assert_problem(client.get("/v1/models/nope"), 404, "model_not_found")
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["models"] == {"tiny_classifier": [1], "tiny_detector": [1]}
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_observers_get_the_probe_statistics(backend_app, images):
    service = backend_app.extensions["imgserve"]
    capture = Capture()
    service.add_observer(capture)
    try:
        files = {"image": [(io.BytesIO(images["png"]), "a"), (io.BytesIO(images["jpeg"]), "b")]}
        r = backend_app.test_client().post("/v1/detect", data=files)
        assert r.status_code == 200
    finally:
        service.remove_observer(capture)
    (event,) = capture.events
    total = event.model.card.bn_reference.total_channels
    assert event.outputs["bn_input_mean"].shape == (2, total)
    assert event.outputs["bn_input_sqmean"].shape == (2, total)
    # E[x^2] >= E[x]^2 per channel: real statistics, not placeholders.
    assert np.all(event.outputs["bn_input_sqmean"] + 1e-6 >= event.outputs["bn_input_mean"] ** 2)
    assert event.inputs.shape == (2, 40, 40, 3)
    assert event.result.request_id == r.get_json()["request_id"]


def test_concurrent_requests_all_succeed(backend_app, images):
    client = backend_app.test_client
    statuses = []

    def worker() -> None:
        c = client()
        for _ in range(4):
            statuses.append(
                c.post("/v1/classify", data=images["png"], content_type="image/png").status_code
            )

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * 24


# -- TF Serving backends: slow, failing, down --------------------------------------------
@pytest.fixture(scope="module", params=REMOTE)
def remote_app(request, serving_repo, standin):
    app = create_app(settings_for(request.param, serving_repo, standin))
    yield app
    app.extensions["imgserve"].close()


def test_slow_backend_hits_the_deadline(remote_app, healthy_standin, images):
    healthy_standin.delay_s = 2.0
    client = remote_app.test_client()
    t0 = time.monotonic()
    r = client.post(
        "/v1/classify",
        data=images["png"],
        content_type="image/png",
        headers={"X-Request-Timeout": "0.3"},
    )
    assert_problem(r, 504, "backend_timeout")
    assert time.monotonic() - t0 < 1.5  # the deadline, not the 2 s delay


@pytest.mark.parametrize(
    ("code", "status", "problem"),
    [
        (grpc.StatusCode.INTERNAL, 502, "backend_error"),
        (grpc.StatusCode.INVALID_ARGUMENT, 502, "backend_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 503, "unavailable"),
    ],
)
def test_backend_errors_are_mapped(
    remote_app, healthy_standin, images, caplog, code, status, problem
):
    healthy_standin.fail = (code, "injected failure")
    with caplog.at_level(logging.WARNING, logger="serving.api.rest.problems"):
        r = remote_app.test_client().post(
            "/v1/classify", data=images["png"], content_type="image/png"
        )
    doc = assert_problem(r, status, problem)
    if status == 502:
        # The backend's own message and gRPC status name stay in the gateway's log.
        assert "injected failure" not in doc["detail"] and code.name not in doc["detail"]
        logged = [rec.getMessage() for rec in caplog.records]
        assert any("injected failure" in m and doc["request_id"] in m for m in logged)
    else:
        assert "injected failure" in doc["detail"]
    if status == 503:
        assert r.headers["Retry-After"] == "1"


def test_request_ids_are_forwarded_to_tf_serving(serving_repo, standin, images):
    app = create_app(settings_for("tfserving-grpc", serving_repo, standin))
    try:
        r = app.test_client().post(
            "/v1/classify",
            data=images["png"],
            content_type="image/png",
            headers={"X-Request-ID": "trace-7"},
        )
        assert r.status_code == 200
        assert standin.last_metadata.get("x-request-id") == "trace-7"
    finally:
        app.extensions["imgserve"].close()


@pytest.mark.parametrize("backend", REMOTE)
def test_backend_down_from_the_start(serving_repo, images, backend):
    dead = {
        "tfserving_grpc": f"127.0.0.1:{free_port()}",
        "tfserving_rest": f"http://127.0.0.1:{free_port()}",
    }
    app = create_app(settings_for(backend, serving_repo, **dead))
    try:
        client = app.test_client()
        ready = client.get("/readyz")
        doc = assert_problem(ready, 503)
        assert doc["readiness"]["backend_reachable"] is False
        r = client.post("/v1/classify", data=images["png"], content_type="image/png")
        assert_problem(r, 503)
        assert r.headers["Retry-After"]
    finally:
        app.extensions["imgserve"].close()


@pytest.mark.parametrize("backend", REMOTE)
def test_backend_going_down_is_502_then_not_ready(serving_repo, images, backend):
    server = TFServingStandIn(serving_repo).start()
    app = create_app(settings_for(backend, serving_repo, server))
    try:
        client = app.test_client()
        assert (
            client.post("/v1/classify", data=images["png"], content_type="image/png").status_code
            == 200
        )
        server.stop()
        r = client.post("/v1/classify", data=images["png"], content_type="image/png")
        doc = assert_problem(r, 502, "backend_unavailable")
        # No backend address, port or gRPC internals in what the client sees.
        body = r.get_data(as_text=True)
        assert "127.0.0.1" not in body and str(server.grpc_port) not in body
        assert str(server.rest_port) not in body and "ipv4" not in body
        assert doc["detail"] == "the model backend is unreachable; retry later"
        app.extensions["imgserve"].refresh()
        assert_problem(client.get("/readyz"), 503)
    finally:
        app.extensions["imgserve"].close()


@pytest.mark.parametrize("backend", REMOTE)
def test_signature_mismatch_keeps_a_version_out_of_service(mutable_repo, backend):
    import json

    card_path = mutable_repo / "tiny_detector" / "1" / "assets.extra" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["signature"]["outputs"]["detection_masks"] = {"dtype": "float32", "shape": [-1, 3, 8, 8]}
    card_path.write_text(json.dumps(card))
    server = TFServingStandIn(mutable_repo).start()
    app = create_app(settings_for(backend, mutable_repo, server))
    try:
        detail = app.test_client().get("/v1/models/tiny_detector").get_json()
        (version,) = detail["versions"]
        assert version["state"] == "AVAILABLE" or "detection_masks" in version.get("error", "")
        assert "detection_masks" in version["error"]
        assert app.extensions["imgserve"].readiness()[1]["models"] == {"tiny_classifier": [1]}
    finally:
        app.extensions["imgserve"].close()
        server.stop()


@pytest.mark.parametrize("name", [tiny_models.CLASSIFIER, "tiny_detector"])
def test_embedded_calls_the_signature_it_loaded_bit_for_bit(serving_repo, name):
    """The servable's traced call of the signature answers exactly as the restored
    signature does, for any batch size, and resolves no variable per call."""
    from unittest import mock

    from tensorflow.python.distribute import distribute_utils

    from serving.backends.embedded import direct_signature

    loaded = tf.saved_model.load(str(serving_repo / name / "1"))
    signature = loaded.signatures["serving_default"]
    spec = signature.structured_input_signature[1]["images"]
    resolving = mock.patch.object(
        distribute_utils, "is_distributed_variable", side_effect=AssertionError
    )
    with resolving, pytest.raises(AssertionError):  # the restored signature: on every call
        signature(images=tf.zeros((1, *spec.shape[1:])))
    fn = direct_signature(loaded, "serving_default", "images")
    rng = np.random.default_rng(0)
    for n in (1, 3):
        x = tf.constant(rng.uniform(-1, 1, (n, *spec.shape[1:])).astype(np.float32))
        want = signature(images=x)
        with mock.patch.object(
            distribute_utils, "is_distributed_variable", side_effect=AssertionError("per call")
        ):
            got = fn(x)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k].numpy(), want[k].numpy())
    bad = tf.zeros((1, *spec.shape[1:3], 4))  # four channels: refused by both alike
    for call in (fn, lambda x: signature(images=x)):
        with pytest.raises(tf.errors.InvalidArgumentError):
            call(bad)


# -- embedded backend: deadlines, broken versions, hot reload --------------------------------
def test_embedded_deadline_is_a_typed_error(client, images):
    r = client.post(
        "/v1/classify",
        data=images["png"],
        content_type="image/png",
        headers={"X-Request-Timeout": "0.000001"},
    )
    doc = assert_problem(r, r.status_code)
    # The deadline may already have passed before the decode (503 preprocess_timeout).
    assert (r.status_code, doc["code"]) in (
        (503, "preprocess_timeout"),
        (503, "queue_timeout"),
        (504, "backend_timeout"),
    )


def test_a_broken_version_is_reported_and_the_old_one_keeps_serving(mutable_repo, images):
    import json
    import shutil

    broken = mutable_repo / "tiny_classifier" / "2"
    shutil.copytree(mutable_repo / "tiny_classifier" / "1", broken)
    (broken / "saved_model.pb").write_bytes(b"not a saved model")
    card_path = broken / "assets.extra" / "model_card.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "version": 2}))
    ModelRepository(mutable_repo).set_labels("tiny_classifier", {"canary": 2})
    app = create_app(settings_for("embedded", mutable_repo))
    try:
        client = app.test_client()
        versions = {
            v["version"]: v for v in client.get("/v1/models/tiny_classifier").get_json()["versions"]
        }
        assert versions[1]["state"] == "AVAILABLE"
        assert versions[2]["state"] == "END" and "load failed" in versions[2]["error"]
        r = client.post("/v1/classify", data=images["png"], content_type="image/png")
        assert r.status_code == 200 and r.get_json()["model"]["version"] == 1
        # The label points at a version that never loaded: retryable, not a 404.
        r = client.post("/v1/classify?label=canary", data=images["png"], content_type="image/png")
        assert_problem(r, 503)
    finally:
        app.extensions["imgserve"].close()


def test_new_versions_are_picked_up_without_failing_requests(mutable_repo, images):
    """Publish v2 and move ``stable`` while requests flow, then retire v1: no request fails."""
    app = create_app(settings_for("embedded", mutable_repo, poll_interval_s=0.2))
    repo = ModelRepository(mutable_repo)
    stop = threading.Event()
    results: list[tuple[int, int | None, float, float]] = []  # status, version, start, end

    def traffic() -> None:
        client = app.test_client()
        while not stop.is_set():
            start = time.monotonic()
            r = client.post("/v1/classify", data=images["png"], content_type="image/png")
            version = r.get_json().get("model", {}).get("version")
            results.append((r.status_code, version, start, time.monotonic()))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: len(results) >= 5)
        tiny_models.export_classifier(mutable_repo, seed=3)  # version 2, labelled stable
        assert wait_for(lambda: any(r[1] == 2 for r in results)), "stable never moved to v2"
        repo.set_labels("tiny_classifier", {"stable": 2}, keep=1)  # v1 leaves service
        service = app.extensions["imgserve"]
        assert wait_for(lambda: service.readiness()[1]["models"]["tiny_classifier"] == [2])
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    client = app.test_client()
    try:
        failures = [r for r in results if r[0] != 200]
        assert not failures, failures[:5]
        assert results[0][1] == 1 and results[-1][1] == 2
        # Once a response came from v2, the label never went back: every request that
        # started after the first v2 answer was answered by v2.
        first_v2 = min(end for _, v, _, end in results if v == 2)
        assert {v for _, v, start, _ in results if start > first_v2} == {2}
        r = client.post("/v1/classify?version=1", data=images["png"], content_type="image/png")
        assert_problem(r, 404, "version_not_found")
        models = client.get("/v1/models/tiny_classifier").get_json()
        states = {v["version"]: v["state"] for v in models["versions"]}
        assert states == {1: "END", 2: "AVAILABLE"}
    finally:
        app.extensions["imgserve"].close()


def test_admin_reload_needs_the_token(mutable_repo, images):
    app = create_app(settings_for("embedded", mutable_repo, admin_token="s3cret"))
    try:
        client = app.test_client()
        assert_problem(client.post("/v1/admin/reload"), 401, "unauthorized")
        assert_problem(
            client.post("/v1/admin/reload", headers={"Authorization": "Bearer nope"}), 401
        )
        tiny_models.export_classifier(mutable_repo, labels=("canary",))
        r = client.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        (model,) = [m for m in r.get_json()["models"] if m["name"] == "tiny_classifier"]
        assert model["version_labels"] == {"stable": 1, "canary": 2}
        r = client.post("/v1/classify?label=canary", data=images["png"], content_type="image/png")
        assert r.get_json()["model"] == {
            "name": "tiny_classifier",
            "version": 2,
            "labels": ["canary"],
        }
    finally:
        app.extensions["imgserve"].close()
    disabled = create_app(settings_for("embedded", mutable_repo))
    try:
        assert_problem(disabled.test_client().post("/v1/admin/reload"), 404)
    finally:
        disabled.extensions["imgserve"].close()
