"""The gRPC API on a real server on loopback: messages, status codes, health, reflection."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.api.grpc.server import GrpcGateway
from serving.api.grpc.servicer import SERVICE_NAME
from serving.backends import create_backend
from serving.proto import imgserve_pb2, imgserve_pb2_grpc
from serving.service import InferenceService
from tests.helpers.gateway import settings_for


@pytest.fixture(scope="module")
def gateway(embedded_app):
    server = GrpcGateway(embedded_app.extensions["imgserve"], "127.0.0.1:0", max_workers=8).start()
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return imgserve_pb2_grpc.ImageServiceStub(channel)


def call_error(fn, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=10, **kw)
    return info.value


def trailing(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


def test_classify_like_the_readme_example(channel, images):
    # The README's client example, verbatim apart from the channel.
    stub = imgserve_pb2_grpc.ImageServiceStub(channel)
    request = imgserve_pb2.ClassifyRequest(
        model=imgserve_pb2.ModelSelector(name="tiny_classifier", label="stable"),
        images=[images["jpeg"]],
        top_k=3,
    )
    response, call = stub.Classify.with_call(
        request, timeout=5.0, metadata=[("x-request-id", "readme-1")]
    )
    assert response.request_id == "readme-1"
    assert dict(call.initial_metadata())["x-request-id"] == "readme-1"
    assert (response.model.name, response.model.version, list(response.model.labels)) == (
        "tiny_classifier",
        1,
        ["stable"],
    )
    (prediction,) = response.predictions
    assert len(prediction.classes) == 3
    scores = [c.score for c in prediction.classes]
    assert scores == sorted(scores, reverse=True)


def test_grpc_and_rest_give_the_same_answer(stub, client, images):
    rest = client.post(
        "/v1/detect?max_detections=1", data=images["png"], content_type="image/png"
    ).get_json()
    response = stub.Detect(
        imgserve_pb2.DetectRequest(images=[images["png"]], max_detections=1), timeout=10
    )
    (image,) = response.predictions
    (rest_image,) = rest["predictions"]
    assert (image.width, image.height) == (rest_image["width"], rest_image["height"])
    (det,) = image.detections
    (rest_det,) = rest_image["detections"]
    assert det.label == rest_det["label"]
    assert det.box.xmax == pytest.approx(rest_det["box"]["xmax"], rel=1e-6)
    assert det.score == pytest.approx(rest_det["score"], rel=1e-6)


@pytest.mark.parametrize(
    ("request_factory", "code", "http_status", "problem"),
    [
        (
            lambda im: imgserve_pb2.ClassifyRequest(images=[b"junk"]),
            "INVALID_ARGUMENT",
            "400",
            "undecodable_image",
        ),
        (
            lambda im: imgserve_pb2.ClassifyRequest(images=[]),
            "INVALID_ARGUMENT",
            "400",
            "bad_request",
        ),
        (
            lambda im: imgserve_pb2.ClassifyRequest(images=[im["png"]] * 33),
            "INVALID_ARGUMENT",
            "413",
            "too_many_images",
        ),
        (
            lambda im: imgserve_pb2.ClassifyRequest(images=[im["png"]], top_k=0),
            "INVALID_ARGUMENT",
            "400",
            "invalid_parameter",
        ),
        (
            lambda im: imgserve_pb2.ClassifyRequest(
                images=[im["png"]],
                model=imgserve_pb2.ModelSelector(name="tiny_classifier", version=9),
            ),
            "NOT_FOUND",
            "404",
            "version_not_found",
        ),
        (
            lambda im: imgserve_pb2.ClassifyRequest(
                images=[im["png"]], model=imgserve_pb2.ModelSelector(label="canary")
            ),
            "NOT_FOUND",
            "404",
            "label_not_found",
        ),
        (
            lambda im: imgserve_pb2.ClassifyRequest(
                images=[im["png"]], model=imgserve_pb2.ModelSelector(name="nope")
            ),
            "NOT_FOUND",
            "404",
            "model_not_found",
        ),
    ],
)
def test_errors_map_to_status_codes(stub, images, request_factory, code, http_status, problem):
    err = call_error(stub.Classify, request_factory(images))
    assert err.code() == getattr(grpc.StatusCode, code)
    meta = trailing(err)
    assert meta["http-status"] == http_status and meta["problem-code"] == problem
    assert "grpc-retry-pushback-ms" not in meta  # a client error: retrying will not help
    assert "Traceback" not in (err.details() or "")


def test_models(stub):
    listed = stub.ListModels(imgserve_pb2.ListModelsRequest(), timeout=5)
    assert sorted(m.name for m in listed.models) == ["tiny_classifier", "tiny_detector"]
    model = stub.GetModel(imgserve_pb2.GetModelRequest(name="tiny_detector"), timeout=5)
    assert model.task == "detection" and dict(model.version_labels) == {"stable": 1}
    assert '"name": "tiny_detector"' in model.versions[0].model_card_json
    assert (
        call_error(stub.GetModel, imgserve_pb2.GetModelRequest(name="nope")).code()
        == grpc.StatusCode.NOT_FOUND
    )


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_full_queue_is_resource_exhausted_with_retry_after(serving_repo, healthy_standin, images):
    """Capacity 1 in front of a slow TF Serving: concurrent calls are shed, not queued."""
    settings = settings_for(
        "tfserving-grpc",
        serving_repo,
        healthy_standin,
        max_batch_size=1,
        max_enqueued_batches=1,
        num_batch_threads=1,
    )
    service = InferenceService(settings, create_backend(settings)).start(poll=False)
    server = GrpcGateway(service, "127.0.0.1:0", max_workers=8).start()
    healthy_standin.delay_s = 0.3
    codes: list = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = imgserve_pb2_grpc.ImageServiceStub(ch)

            def one() -> None:
                try:
                    stub.Classify(imgserve_pb2.ClassifyRequest(images=[images["png"]]), timeout=10)
                    codes.append(("OK", {}))
                except grpc.RpcError as err:
                    codes.append((err.code().name, trailing(err)))

            threads = [threading.Thread(target=one) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
    finally:
        server.stop(grace=1)
        service.close()
    names = [c for c, _ in codes]
    assert len(names) == 6 and "OK" in names and "RESOURCE_EXHAUSTED" in names
    assert set(names) <= {"OK", "RESOURCE_EXHAUSTED"}
    shed = [meta for c, meta in codes if c == "RESOURCE_EXHAUSTED"]
    assert all(meta["http-status"] == "429" and meta["retry-after"] == "1" for meta in shed)
    # gRPC retry policies read the pushback trailer, in milliseconds, not retry-after.
    assert all(meta["grpc-retry-pushback-ms"] == "1000" for meta in shed)


def test_grpc_metrics_use_the_same_names(gateway, stub, images):
    from tests.helpers.metrics_text import parse, value

    stub.Classify(imgserve_pb2.ClassifyRequest(images=[images["png"]]), timeout=10)
    text = gateway.service.metrics.render()[0].decode()
    m = parse(text)
    endpoint = f"/{SERVICE_NAME}/Classify"
    assert (
        value(m, "imgserve_requests_total", endpoint=endpoint, model="tiny_classifier", code="200")
        >= 1
    )
    assert value(m, "imgserve_request_duration_seconds_count", endpoint=endpoint) >= 1
