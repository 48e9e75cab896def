"""Integration: real gunicorn and the gRPC server process on loopback, and a bounded load test."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.proto import imgserve_pb2, imgserve_pb2_grpc
from tests.helpers import tiny_models
from tests.helpers.log_lines import as_text
from tests.helpers.metrics_text import parse, promtool_check, value
from tests.helpers.servers import PYTHON, children_of, free_port, gunicorn, start, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(serving_repo, tmp_path_factory):
    """gunicorn with two workers, Prometheus multiprocess mode as configured for production."""
    proc, url, log = gunicorn(
        serving_repo, tmp_path_factory.mktemp("gunicorn"), workers="2", threads="8"
    )
    yield url, proc, log
    stop(proc)


def test_gunicorn_serves_the_api(server, images):
    url, _, _ = server
    r = requests.post(
        f"{url}/v1/classify",
        data=images["jpeg"],
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["model"]["name"] == "tiny_classifier"
    assert r.headers["X-Request-ID"] == r.json()["request_id"]
    r = requests.post(
        f"{url}/v1/detect", files=[("image", ("a.png", images["png"], "image/png"))], timeout=30
    )
    assert r.status_code == 200 and r.json()["predictions"][0]["detections"]
    truncated = images["jpeg"][: len(images["jpeg"]) // 2]
    r = requests.post(
        f"{url}/v1/classify", data=truncated, headers={"Content-Type": "image/jpeg"}, timeout=30
    )
    assert r.status_code == 400 and r.headers["Content-Type"] == "application/problem+json"
    # A chunked body over the limit (no Content-Length to check up front).
    chunks = (b"\0" * 1024 * 1024 for _ in range(25))
    r = requests.post(
        f"{url}/v1/classify", data=chunks, headers={"Content-Type": "image/png"}, timeout=60
    )
    assert r.status_code == 413 and r.headers["Content-Type"] == "application/problem+json"
    assert requests.get(f"{url}/openapi.json", timeout=10).json()["openapi"].startswith("3.")


def test_metrics_add_up_across_workers(server, images):
    url, _, _ = server
    before = value(
        parse(requests.get(f"{url}/metrics", timeout=10).text),
        "imgserve_requests_total",
        endpoint="/v1/classify",
        code="200",
    )
    for _ in range(12):
        # A new connection per request, so both workers take some.
        r = requests.post(
            f"{url}/v1/classify",
            data=images["png"],
            headers={"Content-Type": "image/png", "Connection": "close"},
            timeout=30,
        )
        assert r.status_code == 200
    # Each scrape is answered by one worker; every one must see the sum over workers.
    for _ in range(6):
        text = requests.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=10).text
        m = parse(text)
        assert (
            value(m, "imgserve_requests_total", endpoint="/v1/classify", code="200") == before + 12
        )
        assert value(m, "imgserve_inflight_requests") == 0
        assert value(m, "imgserve_model_version_info", model="tiny_classifier", label="stable") == 1
    promtool_check(text)


def ready_of(url: str) -> tuple[float, float]:
    """(ready, configured) serving processes, from one scrape."""
    m = parse(requests.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=10).text)
    return value(m, "imgserve_ready_processes"), value(m, "imgserve_configured_processes")


def wait_for_ready(url: str, want: float, timeout: float, interval: float = 0.2) -> list:
    """Scrape until ``want`` processes are ready; returns every (ready, configured) seen."""
    seen = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        seen.append(ready_of(url))
        if seen[-1][0] == want:
            return seen
        time.sleep(interval)
    raise AssertionError(f"not {want} ready processes after {timeout}s: {seen[-5:]}")


def test_a_scrape_says_how_many_workers_are_ready(server):
    """Readiness is per worker; the scrape sums it, so "1 of 2 workers ready" is visible
    while a replacement worker loads its models."""
    url, proc, _ = server
    wait_for_ready(url, 2, 120)
    assert ready_of(url) == (2, 2)
    victim = sorted(children_of(proc.pid))[0]
    os.kill(victim, signal.SIGKILL)
    # gunicorn reaps it (child_exit drops its live gauges) and starts a replacement,
    # which loads TensorFlow and the models before it counts.
    seen = wait_for_ready(url, 1, 60, interval=0.1)
    assert all(configured == 2 for _, configured in seen)
    wait_for_ready(url, 2, 120)
    assert victim not in children_of(proc.pid) and len(children_of(proc.pid)) == 2


def test_graceful_shutdown(serving_repo, tmp_path, images):
    proc, url, log = gunicorn(serving_repo, tmp_path, workers="1")
    metrics_dir = None
    for line in as_text(log).splitlines():
        if "metrics=" in line:
            metrics_dir = line.rsplit("metrics=", 1)[1].strip()
    result: list[int] = []
    slow_request = threading.Thread(
        target=lambda: result.append(
            requests.post(
                f"{url}/v1/classify",
                data=images["png"] * 1,
                headers={"Content-Type": "image/png"},
                timeout=30,
            ).status_code
        )
    )
    slow_request.start()
    time.sleep(0.05)
    assert stop(proc) == 0
    slow_request.join(30)
    assert result in ([200], [])  # answered, or not yet accepted when the listener closed
    if metrics_dir:
        assert not Path(metrics_dir).exists()


def test_grpc_server_process(serving_repo, tmp_path, images):
    """One process (IMGSERVE_GRPC_WORKERS=1): the server itself, no supervisor.

    Several workers: tests/serving/api/grpc/test_supervisor.py.
    """
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "grpc.log"
    proc = start(
        [PYTHON, "-m", "serving.api.grpc"],
        {
            "IMGSERVE_MODEL_BASE": str(serving_repo),
            "IMGSERVE_GRPC_BIND": f"127.0.0.1:{port}",
            "IMGSERVE_GRPC_METRICS_BIND": f"127.0.0.1:{metrics_port}",
            "IMGSERVE_GRPC_WORKERS": "1",
        },
        log,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            end = time.monotonic() + 120
            status = None
            while time.monotonic() < end and proc.poll() is None:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    time.sleep(0.25)
            assert status == health_pb2.HealthCheckResponse.SERVING, log.read_text()[-3000:]
            assert not children_of(proc.pid)  # it serves: no worker processes
            stub = imgserve_pb2_grpc.ImageServiceStub(channel)
            response = stub.Classify(
                imgserve_pb2.ClassifyRequest(images=[images["png"]], top_k=1), timeout=10
            )
            assert (
                response.model.name == "tiny_classifier"
                and len(response.predictions[0].classes) == 1
            )
            with pytest.raises(grpc.RpcError) as info:
                stub.Detect(imgserve_pb2.DetectRequest(images=[b"junk"]), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        m = parse(text)
        assert (
            value(
                m,
                "imgserve_requests_total",
                endpoint="/imgserve.v1.ImageService/Classify",
                code="200",
            )
            == 1
        )
        assert (
            value(
                m,
                "imgserve_requests_total",
                endpoint="/imgserve.v1.ImageService/Detect",
                code="400",
            )
            == 1
        )
        promtool_check(text)
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


def test_load_no_errors_below_saturation_only_shedding_above(tmp_path_factory, images):
    """A model slow enough to saturate; a queue of 4 images; closed-loop clients, bounded in time."""
    base = tmp_path_factory.mktemp("heavy_models")
    tiny_models.export_heavy_classifier(base)
    proc, url, log = gunicorn(
        base,
        tmp_path_factory.mktemp("load"),
        workers="1",
        threads="64",
        max_batch_size="2",
        max_enqueued_batches="2",
        batch_timeout_micros="2000",
    )

    def run(clients: int, seconds: float) -> Counter:
        statuses: Counter = Counter()
        retry_after: list[str | None] = []
        end = time.monotonic() + seconds

        def client() -> None:
            session = requests.Session()
            while time.monotonic() < end:
                r = session.post(
                    f"{url}/v1/classify",
                    data=images["png"],
                    headers={"Content-Type": "image/png"},
                    timeout=30,
                )
                statuses[r.status_code] += 1
                if r.status_code in (429, 503):
                    retry_after.append(r.headers.get("Retry-After"))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
        assert all(retry_after), "shed responses must carry Retry-After"
        return statuses

    try:
        below = run(clients=2, seconds=3)
        assert set(below) == {200} and below[200] > 5, below
        above = run(clients=32, seconds=4)
        assert set(above) <= {200, 429, 503}, above
        assert above[200] > 0 and above[429] + above[503] > 0, above
    finally:
        stop(proc)
