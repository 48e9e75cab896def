"""The Open Inference Protocol v2 (``serving/api/oip.py``, ``rest/v2.py``, ``grpc/oip.py``).

tritonclient, a client nobody here wrote, talks to real gunicorn and a real gRPC
server on loopback from its own virtualenv (``.venv-clients``: it needs
protobuf < 7, the product pins 7), and its answers must equal ``/v1/classify`` and
``/v1/detect`` for the same files. Plain JSON and bad input go through ``requests``
and the generated gRPC stub of this checkout.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from contract.preprocessing import decode_image, preprocess_pixels
from serving.api import oip
from serving.errors import BadRequest, InvalidParameter
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.helpers import tiny_models
from tests.helpers.metrics_text import parse, value
from tests.helpers.photos import photo
from tests.helpers.servers import ROOT, grpc_server, gunicorn, stop

CLIENT_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
CLIENT_SCRIPT = ROOT / "tests" / "clients" / "tritonclient_checks.py"
CLASSIFIER, DETECTOR = tiny_models.CLASSIFIER, tiny_models.DETECTOR


# -- the raw BYTES encoding (no server) ------------------------------------------------
def test_bytes_elements_round_trip_with_length_prefixes():
    items = [b"", b"abc", bytes(range(256))]
    raw = oip.serialize_bytes(items)
    assert raw[:8] == b"\x00\x00\x00\x00\x03\x00\x00\x00"  # little-endian lengths 0, 3
    assert oip.deserialize_bytes(raw, "x") == items


@pytest.mark.parametrize("raw", [b"\x05\x00\x00\x00abc", b"\x01\x00"])
def test_truncated_bytes_elements_are_refused(raw):
    with pytest.raises(BadRequest, match="input 'x'"):
        oip.deserialize_bytes(raw, "x")


@pytest.mark.parametrize("shape", [[10**20], [2**40, 2**40], [2**62, 4]])
@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_shapes_past_int64_are_refused_not_wrapped(shape, datatype):
    # In int64 the first overflowed (a 500) and the others wrapped to 0 elements,
    # which an empty body or an empty data list then "filled".
    assert oip.element_count(shape) == math.prod(shape)
    with pytest.raises(InvalidParameter):
        oip.input_from_raw("x", datatype, shape, b"")
    with pytest.raises(InvalidParameter):
        oip.input_from_values("x", datatype, shape, [])


# -- real servers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return tiny_models.build_repository(tmp_path_factory.mktemp("oip") / "models")


@pytest.fixture(scope="module")
def servers(repo, tmp_path_factory):
    """Gunicorn and the gRPC server on the same repository, started side by side."""
    tmp = tmp_path_factory.mktemp("oip-servers")
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(gunicorn, repo, tmp, workers="1"),
            pool.submit(grpc_server, repo, tmp),
        ]
    started, failures = [], []
    for future in futures:
        try:
            started.append(future.result())
        except Exception as exc:  # stop the one that did start before failing
            failures.append(exc)
    if failures:
        for proc, _, _ in started:
            stop(proc)
        raise failures[0]
    yield started[0][1], started[1][1]
    for proc, _, _ in started:
        stop(proc)


@pytest.fixture(scope="module")
def rest_url(servers) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def grpc_address(servers) -> str:
    return servers[1]


def encoded(name: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    photo(name).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Two real photos (JPEG, PNG) and the JPEG preprocessed for the classifier."""
    d = tmp_path_factory.mktemp("oip-files")
    jpeg = encoded("chelsea.png", "JPEG")
    (d / "a.jpg").write_bytes(jpeg)
    (d / "b.png").write_bytes(encoded("coffee.png", "PNG"))
    spec = tiny_models.CLASSIFIER_SPEC
    batch, _ = preprocess_pixels(decode_image(jpeg, spec=spec), spec)
    np.save(d / "input.npy", batch[None].astype(np.float32))
    return d


@pytest.fixture(scope="module")
def client_python() -> Path:
    if not CLIENT_PYTHON.exists():
        reason = f"{CLIENT_PYTHON} is missing: build it with `make setup`"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return CLIENT_PYTHON


def v1_answers(rest_url: str, files: Path) -> tuple[dict, dict]:
    """What the gateway's own API says about the same files, in name order."""
    paths = sorted(files.glob("*.*g"))
    multipart = [("image", (p.name, p.read_bytes())) for p in paths]
    classify = requests.post(
        f"{rest_url}/v1/classify", files=multipart, data={"top_k": "2"}, timeout=30
    )
    detect = requests.post(f"{rest_url}/v1/detect", files=multipart, timeout=30)
    assert classify.status_code == 200 and detect.status_code == 200
    return classify.json(), detect.json()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_answers_equal_the_gateway_api(
    protocol, client_python, files, rest_url, grpc_address
):
    url = rest_url.removeprefix("http://") if protocol == "http" else grpc_address
    run = subprocess.run(
        [str(client_python), str(CLIENT_SCRIPT), protocol, url, str(files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["files"] == ["a.jpg", "b.png"]
    assert report["live"] and report["ready"]
    assert report["model_ready"] and report["version_ready"]
    h, w = tiny_models.CLASSIFIER_SPEC.height, tiny_models.CLASSIFIER_SPEC.width
    assert report["metadata"] == {
        "name": CLASSIFIER,
        "versions": ["1"],
        "platform": "tensorflow_savedmodel",
        "inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, h, w, 3]},
        ],
    }
    classify, detect = v1_answers(rest_url, files)
    expected = [p["classes"] for p in classify["predictions"]]
    assert report["classify"]["labels"] == [[c["label"] for c in row] for row in expected]
    assert np.allclose(
        report["classify"]["scores"], [[c["score"] for c in row] for row in expected], atol=1e-6
    )
    found = [p["detections"] for p in detect["predictions"]]
    assert report["detect"]["num_detections"] == [len(d) for d in found] == [2, 2]
    assert report["detect"]["detection_classes"] == [[d["label"] for d in row] for row in found]
    boxes = [
        [[d["box"][k] for k in ("ymin", "xmin", "ymax", "xmax")] for d in row] for row in found
    ]
    assert np.allclose(report["detect"]["detection_boxes"], boxes, atol=1e-3)
    assert np.allclose(
        report["detect"]["detection_scores"], [[d["score"] for d in row] for row in found]
    )
    # The preprocessed form of a.jpg gives the probabilities its encoded form was scored by.
    probabilities = np.asarray(report["tensor"]["probabilities"])[0]
    labels = [c["label"] for c in expected[0]]
    order = [tiny_models.CLASSIFIER_LABELS.index(label) for label in labels]
    assert np.allclose(probabilities[order], [c["score"] for c in expected[0]], atol=1e-5)
    assert "model 'no_such_model' is not served" in report["unknown_model"]


def b64_images(files: Path) -> dict:
    data = [base64.b64encode(p.read_bytes()).decode() for p in sorted(files.glob("*.*g"))]
    return {
        "name": "images",
        "datatype": "BYTES",
        "shape": [len(data)],
        "parameters": {"content_type": "base64"},
        "data": data,
    }


@pytest.mark.slow
def test_plain_json_with_base64_images_equals_v1_classify(rest_url, files):
    body = {"id": "req-7", "inputs": [b64_images(files)], "parameters": {"top_k": 2}}
    r = requests.post(f"{rest_url}/v2/models/{CLASSIFIER}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["model_name"], doc["model_version"], doc["id"]) == (CLASSIFIER, "1", "req-7")
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["labels"]["shape"] == [2, 2] and outputs["scores"]["datatype"] == "FP32"
    expected = [p["classes"] for p in v1_answers(rest_url, files)[0]["predictions"]]
    assert outputs["labels"]["data"] == [c["label"] for row in expected for c in row]
    assert np.allclose(outputs["scores"]["data"], [c["score"] for row in expected for c in row])
    text = requests.get(f"{rest_url}/metrics", timeout=10).text
    endpoint = "/v2/models/<name>/infer"
    assert value(parse(text), "imgserve_requests_total", endpoint=endpoint, code="200") >= 1


def image_input(data: list[str], **changes) -> dict:
    tensor = {
        "name": "images",
        "datatype": "BYTES",
        "shape": [len(data)],
        "parameters": {"content_type": "base64"},
        "data": data,
    }
    return {**tensor, **changes}


JUNK = base64.b64encode(b"not an image").decode()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            CLASSIFIER,
            {"inputs": [image_input([1.0], datatype="FP32", parameters={})]},
            400,
            "must be BYTES",
        ),
        (CLASSIFIER, {"inputs": [image_input([JUNK], shape=[1, 1])]}, 400, "shape [-1]"),
        (CLASSIFIER, {"inputs": [image_input([JUNK], shape=[2])]}, 400, "needs 2 elements"),
        (CLASSIFIER, {"inputs": [image_input([JUNK])]}, 400, "not a recognised image"),
        (CLASSIFIER, {"inputs": [image_input(["%%%"])]}, 400, "not valid base64"),
        (CLASSIFIER, {"inputs": []}, 400, "exactly one input"),
        (CLASSIFIER, {"inputs": [image_input([JUNK], name="pixels")]}, 400, "unknown input"),
        (
            CLASSIFIER,
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [0.0] * 12}
                ]
            },
            400,
            "shape [-1, 32, 32, 3]",
        ),
        (CLASSIFIER, {"inputs": [image_input([JUNK], shape=[10**20])]}, 400, "needs"),
        (
            CLASSIFIER,
            {"inputs": [image_input([JUNK])], "parameters": {"top_k": 10**400}},
            400,
            "out of range",
        ),
        ("no_such_model", {"inputs": [image_input([JUNK])]}, 404, "is not served"),
        (f"{CLASSIFIER}/versions/9", {"inputs": [image_input([JUNK])]}, 404, "no version 9"),
        # A Unicode digit is no version number: it names a label, and there is none.
        (f"{CLASSIFIER}/versions/²", {"inputs": [image_input([JUNK])]}, 404, "'²'"),
    ],
    ids=[
        "wrong-datatype",
        "wrong-rank",
        "wrong-count",
        "undecodable",
        "bad-base64",
        "missing-input",
        "unknown-input",
        "wrong-tensor-shape",
        "shape-past-int64",
        "parameter-past-float",
        "unknown-model",
        "unknown-version",
        "unicode-digit-version",
    ],
)
def test_bad_input_over_rest(rest_url, path, body, status, message):
    r = requests.post(f"{rest_url}/v2/models/{path}/infer", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.mark.slow
def test_binary_data_that_does_not_fit_is_refused(rest_url):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 9},
                }
            ]
        }
    ).encode()
    r = requests.post(
        f"{rest_url}/v2/models/{CLASSIFIER}/infer",
        data=header + b"\x05\x00\x00\x00ab",
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]
    # A header length in Unicode digits ("²" passes str.isdigit()) is no length.
    r = requests.post(
        f"{rest_url}/v2/models/{CLASSIFIER}/infer",
        data=header,
        headers={"Inference-Header-Content-Length": "²".encode("latin-1")},
        timeout=30,
    )
    assert r.status_code == 400 and "does not fit" in r.json()["error"], r.text


@pytest.mark.slow
def test_health_metadata_and_readiness_over_rest(rest_url):
    assert requests.get(f"{rest_url}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{rest_url}/v2/health/ready", timeout=10).status_code == 200
    server = requests.get(f"{rest_url}/v2", timeout=10).json()
    assert server["name"] == "imgserve" and "binary_tensor_data" in server["extensions"]
    meta = requests.get(f"{rest_url}/v2/models/{DETECTOR}/versions/1", timeout=10).json()
    assert [o["name"] for o in meta["outputs"]] == [
        "detection_boxes",
        "detection_scores",
        "detection_classes",
        "num_detections",
    ]
    assert meta["inputs"][1]["shape"] == [-1, 40, 40, 3]
    missing = requests.get(f"{rest_url}/v2/models/no_such_model/ready", timeout=10)
    assert missing.status_code == 404 and "is not served" in missing.json()["error"]


def grpc_infer(stub, model: str, tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes):
    request = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[raw])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    return info.value


@pytest.mark.slow
def test_bad_input_over_grpc(grpc_address):
    images = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
    with grpc.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        junk = oip.serialize_bytes([b"not an image"])
        err = grpc_infer(stub, CLASSIFIER, images, junk)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a recognised image" in err.details()
        assert dict(err.trailing_metadata())["http-status"] == "400"
        err = grpc_infer(stub, CLASSIFIER, images, junk[:6])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "BYTES" in err.details()
        err = grpc_infer(stub, "no_such_model", images, junk)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        wrong = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3])
        err = grpc_infer(stub, CLASSIFIER, wrong, np.zeros(3, "<f4").tobytes())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in err.details()
        ready = stub.ModelReady(pb.ModelReadyRequest(name=DETECTOR, version="1"), timeout=10)
        assert ready.ready


@pytest.mark.slow
def test_grpc_typed_contents_answer_as_raw_contents(grpc_address, files):
    """The kserve SDK may send typed ``contents`` instead of ``raw_input_contents``."""
    jpeg = (files / "a.jpg").read_bytes()
    typed = pb.ModelInferRequest.InferInputTensor(
        name="images",
        datatype="BYTES",
        shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[jpeg]),
    )
    raw = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
    top_k = {"top_k": pb.InferParameter(int64_param=3)}
    with grpc.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        a = stub.ModelInfer(
            pb.ModelInferRequest(model_name=CLASSIFIER, id="t", inputs=[typed], parameters=top_k),
            timeout=30,
        )
        b = stub.ModelInfer(
            pb.ModelInferRequest(
                model_name=CLASSIFIER,
                model_version="stable",
                inputs=[raw],
                parameters=top_k,
                raw_input_contents=[oip.serialize_bytes([jpeg])],
            ),
            timeout=30,
        )
    assert (a.id, a.model_version, [o.name for o in a.outputs]) == ("t", "1", ["labels", "scores"])
    assert list(a.outputs[0].shape) == [1, 3]
    assert a.raw_output_contents == b.raw_output_contents
    labels = oip.deserialize_bytes(a.raw_output_contents[0], "labels")
    assert sorted(labels) == sorted(label.encode() for label in tiny_models.CLASSIFIER_LABELS)


@pytest.mark.slow
def test_request_timeout_header_is_checked(rest_url, files):
    body = {"inputs": [b64_images(files)]}
    r = requests.post(
        f"{rest_url}/v2/models/{CLASSIFIER}/infer",
        json=body,
        headers={"X-Request-Timeout": "soon"},
        timeout=30,
    )
    assert r.status_code == 400 and "X-Request-Timeout" in r.json()["error"]
