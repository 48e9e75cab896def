"""``imgserve.v1.ImageService/Feedback`` on a real gRPC server on loopback.

Requests classified and detected over gRPC are captured under their ``x-request-id``;
feedback over gRPC records what ``POST /v1/feedback`` records (the REST API then
sees the same feedback as a repeat) and refuses what it refuses, with the error
table's gRPC code and ``http-status`` trailer.
"""

from __future__ import annotations

import io

import grpc
import pytest

from calibration.samples import iter_samples
from serving.api.grpc.server import GrpcGateway
from serving.app import create_app
from serving.proto import imgserve_pb2 as pb
from serving.proto import imgserve_pb2_grpc
from tests.helpers import tiny_models
from tests.helpers.capture_store import wait_captured
from tests.helpers.gateway import settings_for
from tests.helpers.photos import photo

CLASSIFIER, DETECTOR = tiny_models.CLASSIFIER, tiny_models.DETECTOR
#: chelsea.png is 451 wide, 300 high; a box in its pixels (ymin, xmin, ymax, xmax).
BOX = (90.0, 140.0, 230.0, 360.0)


def _png() -> bytes:
    buf = io.BytesIO()
    photo("chelsea.png").convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(serving_repo, tmp_path_factory):
    """(stub, REST test client, capture directory) of one gateway capturing every request."""
    tmp = tmp_path_factory.mktemp("grpc_feedback")
    capture = tmp / "samples"
    settings = settings_for(
        "embedded",
        serving_repo,
        capture_dir=str(capture),
        capture_rate=1.0,
        state_dir=str(tmp / "state"),
    )
    app = create_app(settings)
    server = GrpcGateway(app.extensions["imgserve"], "127.0.0.1:0", max_workers=4).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield imgserve_pb2_grpc.ImageServiceStub(channel), app.test_client(), capture
    finally:
        server.stop(grace=1)
        app.extensions["imgserve"].close()


def _error(call, request) -> tuple[grpc.StatusCode, str, str]:
    """(code, details, http-status trailer) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    err = info.value
    return err.code(), err.details(), dict(err.trailing_metadata() or ())["http-status"]


def test_labels_over_grpc_are_recorded_once_and_seen_by_the_rest_api(served):
    stub, client, capture = served
    images = [_png(), _png()]
    answer = stub.Classify(
        pb.ClassifyRequest(model=pb.ModelSelector(name=CLASSIFIER), images=images),
        metadata=(("x-request-id", "g-labels"),),
        timeout=60,
    )
    assert answer.request_id == "g-labels"
    wait_captured(capture, "g-labels")
    names = list(stub.GetModel(pb.GetModelRequest(name=CLASSIFIER), timeout=30).class_labels)
    labels = pb.ImageLabels(labels=[pb.TrueLabel(name=names[1]), pb.TrueLabel(index=2)])
    request = pb.FeedbackRequest(request_id="g-labels", model=CLASSIFIER, labels=labels)
    first = stub.Feedback(request, timeout=30)
    assert first.created and first.model == CLASSIFIER and first.request_id == "g-labels"
    assert [lab.WhichOneof("value") for lab in first.labels.labels] == ["name", "index"]
    assert (first.labels.labels[0].name, first.labels.labels[1].index) == (names[1], 2)
    assert stub.Feedback(request, timeout=30).created is False  # the same again
    other = pb.FeedbackRequest(
        request_id="g-labels",
        labels=pb.ImageLabels(labels=[pb.TrueLabel(name=names[0])] * 2),
    )
    code, details, status = _error(stub.Feedback, other)
    assert (code, status) == (grpc.StatusCode.ALREADY_EXISTS, "409"), details
    # One store, one record: the REST API sees gRPC's feedback as its own repeat.
    r = client.post("/v1/feedback", json={"request_id": "g-labels", "labels": [names[1], 2]})
    assert r.status_code == 200 and r.get_json()["created"] is False, r.get_json()


def test_boxes_over_grpc_land_in_model_input_pixels(served):
    stub, client, capture = served
    answer = stub.Detect(
        pb.DetectRequest(model=pb.ModelSelector(name=DETECTOR), images=[_png()]),
        metadata=(("x-request-id", "g-boxes"),),
        timeout=60,
    )
    assert (answer.predictions[0].width, answer.predictions[0].height) == (451, 300)
    wait_captured(capture, "g-boxes")
    ymin, xmin, ymax, xmax = BOX
    obj = pb.LabelledObject(
        label=pb.TrueLabel(index=1), box=pb.Box(ymin=ymin, xmin=xmin, ymax=ymax, xmax=xmax)
    )
    objects = pb.ObjectsPerImage(images=[pb.ImageObjects(objects=[obj])])
    reply = stub.Feedback(pb.FeedbackRequest(request_id="g-boxes", objects=objects), timeout=30)
    assert reply.created and reply.model == DETECTOR
    (got,) = reply.objects.images[0].objects
    assert got.label.name == tiny_models.DETECTOR_LABELS[1]  # the index named
    assert (got.box.ymin, got.box.xmin, got.box.ymax, got.box.xmax) == BOX
    # Letterbox into 40x40: the 451x300 photo resized to 40x27 (rounded), 6 rows of
    # padding above it; columns fill the width.
    sy, sx = 27 / 300, 40 / 451
    expected = (ymin * sy + 6, xmin * sx, ymax * sy + 6, xmax * sx)
    input_box = (got.input_box.ymin, got.input_box.xmin, got.input_box.ymax, got.input_box.xmax)
    assert input_box == pytest.approx(expected, abs=1e-3)
    (sample,) = [s for s in iter_samples(capture, DETECTOR) if s.request_id == "g-boxes"]
    assert sample.objects[0].box == pytest.approx(input_box, abs=1e-4)
    body = {"request_id": "g-boxes", "objects": [[{"label": "square", "box": list(BOX)}]]}
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == 200 and r.get_json()["created"] is False, r.get_json()


def test_feedback_refusals_carry_the_error_table_s_codes(served):
    stub, _, capture = served
    stub.Classify(
        pb.ClassifyRequest(model=pb.ModelSelector(name=CLASSIFIER), images=[_png()]),
        metadata=(("x-request-id", "g-classified"),),
        timeout=60,
    )
    wait_captured(capture, "g-classified")
    one = pb.ImageLabels(labels=[pb.TrueLabel(name="red")])
    box = pb.Box(ymin=10, xmin=20, ymax=100, xmax=200)
    square = pb.ImageObjects(
        objects=[pb.LabelledObject(label=pb.TrueLabel(name="square"), box=box)]
    )
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        (pb.FeedbackRequest(request_id="g-classified"), invalid, "400", "'labels'"),
        (pb.FeedbackRequest(labels=one), invalid, "400", "request_id"),
        (pb.FeedbackRequest(request_id="never", labels=one), not_found, "404", "never"),
        (
            pb.FeedbackRequest(request_id="g-classified", model="../x", labels=one),
            invalid,
            "400",
            "not a model name",
        ),
        (
            pb.FeedbackRequest(request_id="g-classified", model="nope", labels=one),
            not_found,
            "404",
            "not served",
        ),
        (
            pb.FeedbackRequest(
                request_id="g-classified", labels=pb.ImageLabels(labels=[pb.TrueLabel()])
            ),
            invalid,
            "422",
            "class name or index",
        ),
        (
            pb.FeedbackRequest(
                request_id="g-classified", objects=pb.ObjectsPerImage(images=[square])
            ),
            invalid,
            "422",
            "classification",
        ),
    ]
    for request, code, status, words in cases:
        got_code, details, got_status = _error(stub.Feedback, request)
        assert (got_code, got_status) == (code, status), (request, details)
        assert words in details, (request, details)


def test_feedback_without_a_capture_store_is_not_found(embedded_app):
    gateway = GrpcGateway(embedded_app.extensions["imgserve"], "127.0.0.1:0", max_workers=2)
    server = gateway.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = imgserve_pb2_grpc.ImageServiceStub(channel)
            request = pb.FeedbackRequest(
                request_id="r", labels=pb.ImageLabels(labels=[pb.TrueLabel(name="red")])
            )
            code, details, status = _error(stub.Feedback, request)
    finally:
        server.stop(grace=1)
    assert (code, status) == (grpc.StatusCode.NOT_FOUND, "404") and "disabled" in details
