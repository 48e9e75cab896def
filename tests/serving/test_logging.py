"""Integration: the gateway's log under real gunicorn and the real gRPC server on loopback.

Every line either server writes (gunicorn master and worker, TensorFlow's start-up,
the app) is a JSON object; a request's id is on its access line and on the lines
logged while serving it; no ``cuInit`` error on a CPU-only start; the level setting
holds (the gRPC server runs at ``debug``, the HTTP gateway at the default ``info``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import requests

from serving.proto import imgserve_pb2, imgserve_pb2_grpc
from tests.helpers import tiny_models
from tests.helpers.log_lines import read_lines
from tests.helpers.servers import (
    PYTHON,
    free_port,
    gunicorn,
    start,
    stop,
    wait_for,
    wait_grpc_ready,
)

pytestmark = pytest.mark.slow

ACCESS = "serving.access"


@pytest.fixture(scope="module")
def model_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("logging_models")
    tiny_models.export_classifier(base)
    return base


@pytest.fixture(scope="module")
def grpc_server(model_base, tmp_path_factory):
    """``python -m serving.api.grpc``, one process, at log level ``debug``: (port, log, process)."""
    port = free_port()
    log = tmp_path_factory.mktemp("grpc_log") / "grpc.log"
    proc = start(
        [PYTHON, "-m", "serving.api.grpc"],
        {
            "IMGSERVE_MODEL_BASE": str(model_base),
            "IMGSERVE_GRPC_BIND": f"127.0.0.1:{port}",
            "IMGSERVE_GRPC_METRICS_BIND": "",
            "IMGSERVE_GRPC_WORKERS": "1",
            "IMGSERVE_LOG_LEVEL": "debug",
        },
        log,
    )
    yield port, log, proc
    assert stop(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def http_server(model_base, tmp_path_factory, grpc_server):
    """gunicorn, one worker, default logging settings: (base URL, log). Started after the
    gRPC process is launched, so the two load TensorFlow at the same time."""
    proc, url, log = gunicorn(
        model_base, tmp_path_factory.mktemp("gunicorn_log"), workers="1", threads="4"
    )
    yield url, log
    assert stop(proc) == 0, log.read_text()[-3000:]


def lines_when(log: Path, found: Callable[[list[dict]], bool], timeout: float = 20) -> list[dict]:
    """The log's lines once ``found(lines)`` holds (every line must be JSON); fails after ``timeout``."""
    lines: list[dict] = []

    def ready() -> bool:
        nonlocal lines
        lines = read_lines(log)
        return found(lines)

    assert wait_for(ready, timeout), f"not logged within {timeout}s:\n{log.read_text()[-3000:]}"
    return lines


def for_request(lines: list[dict], rid: str) -> list[dict]:
    return [x for x in lines if x.get("request_id") == rid]


def test_http_lines_are_json_and_carry_the_request_id(http_server, images):
    url, log = http_server
    bad = requests.post(
        f"{url}/v1/classify",
        data=b"not an image",
        headers={"Content-Type": "image/png", "X-Request-ID": "rest-bad-1"},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.headers["X-Request-ID"] == "rest-bad-1"
    good = requests.post(
        f"{url}/v1/classify",
        data=images["jpeg"],
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert good.status_code == 200
    fresh = good.headers["X-Request-ID"]  # the gateway made this one
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200

    lines = lines_when(
        log, lambda ls: any(x["logger"] == ACCESS for x in for_request(ls, fresh)), timeout=20
    )
    bad_lines = for_request(lines, "rest-bad-1")
    (access,) = [x for x in bad_lines if x["logger"] == ACCESS]
    assert {k: access[k] for k in ("method", "path", "status", "remote_addr")} == {
        "method": "POST",
        "path": "/v1/classify",
        "status": 400,
        "remote_addr": "127.0.0.1",
    }
    assert access["bytes"] == len(bad.content) and access["duration_ms"] > 0
    assert access["user_agent"].startswith("python-requests/")
    # The app's own line while serving it: why the request failed.
    (why,) = [x for x in bad_lines if x["logger"] != ACCESS]
    assert why["level"] == "INFO" and "undecodable_image" in why["message"]

    (ok,) = [x for x in for_request(lines, fresh) if x["logger"] == ACCESS]
    assert ok["status"] == 200 and ok["bytes"] == len(good.content)
    # Probes stay out of the access log by default; gunicorn's own access log is off.
    assert not [x for x in lines if x.get("path") == "/healthz"]
    assert not [x for x in lines if x["logger"] == "gunicorn.access"]
    # Master and worker both write JSON: two processes, gunicorn's lines among them.
    assert len({x["process"] for x in lines if x["logger"] == "gunicorn.error"}) == 2
    # The default level, info: no DEBUG lines (the gRPC server at debug has them).
    assert not [x for x in lines if x["level"] == "DEBUG"]
    assert "cuInit" not in log.read_text()


def test_grpc_lines_are_json_carry_the_request_id_and_follow_the_level(grpc_server, images):
    port, log, proc = grpc_server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_grpc_ready(f"127.0.0.1:{port}", proc, log, timeout=180)
        stub = imgserve_pb2_grpc.ImageServiceStub(channel)
        response, call = stub.Classify.with_call(
            imgserve_pb2.ClassifyRequest(images=[images["png"]]),
            metadata=[("x-request-id", "grpc-ok-1")],
            timeout=30,
        )
        assert dict(call.initial_metadata())["x-request-id"] == "grpc-ok-1"
        assert response.request_id == "grpc-ok-1"
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(
                imgserve_pb2.ClassifyRequest(images=[b"junk"]),
                metadata=[("x-request-id", "grpc-bad-1")],
                timeout=30,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    lines = lines_when(
        log, lambda ls: any(x["logger"] == ACCESS for x in for_request(ls, "grpc-bad-1"))
    )
    method = "/imgserve.v1.ImageService/Classify"
    ok_lines = for_request(lines, "grpc-ok-1")
    (ok,) = [x for x in ok_lines if x["logger"] == ACCESS]
    assert (ok["logger"], ok["method"], ok["code"]) == (ACCESS, method, "OK")
    assert ok["duration_ms"] > 0 and ok["peer"].startswith("ipv4:127.0.0.1:")
    bad_lines = for_request(lines, "grpc-bad-1")
    (bad,) = [x for x in bad_lines if x["logger"] == ACCESS]
    assert (bad["method"], bad["code"]) == (method, "INVALID_ARGUMENT")
    (why,) = [x for x in bad_lines if x["logger"] != ACCESS]
    assert why["level"] == "INFO" and "Classify: INVALID_ARGUMENT" in why["message"]
    # At debug: lines of libraries while serving (Pillow decoding), with the request id,
    # and TensorFlow's C++ start-up lines as records of their own logger.
    assert any(x["level"] == "DEBUG" for x in ok_lines)
    native = [x for x in lines if x["logger"] == "tensorflow.native"]
    assert native and all(x["level"] == "DEBUG" and ".cc:" in x["source"] for x in native)
    assert "cuInit" not in log.read_text()
