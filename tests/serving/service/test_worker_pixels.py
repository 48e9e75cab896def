"""The per-worker decoded-pixel limit: the limiter, its setting, REST and gRPC, and a flood.

The flood sends flat 6000x6000 PNGs (36 M pixels in about 100 KB each) at a real
gunicorn worker from many threads at once and reads the worker's peak resident memory
(``VmHWM``) from ``/proc``: with the limit, one decode at a time is held.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
from PIL import Image

from serving.api.grpc.server import GrpcGateway
from serving.app import create_app
from serving.errors import DecodeCapacityExceeded
from serving.proto import imgserve_pb2, imgserve_pb2_grpc
from serving.service.worker_pixels import WorkerPixelLimit
from serving.settings import Settings, SettingsError
from tests.helpers.gateway import settings_for
from tests.helpers.photos import photo
from tests.helpers.problems import assert_problem
from tests.helpers.servers import children_of, gunicorn, stop


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# scikit-image's chelsea (451x300).
PHOTO = png(photo("chelsea.png").convert("RGB"))
PHOTO_PIXELS = 451 * 300
LIMIT = 1_000_000


# -- the limiter on its own ------------------------------------------------------------------
def test_reservations_add_up_and_are_given_back():
    limit = WorkerPixelLimit(100, retry_after_s=2)
    with limit.reserve(60):
        with limit.reserve(40):
            assert limit.in_flight == 100
        with pytest.raises(DecodeCapacityExceeded) as info, limit.reserve(41):
            pass
        assert limit.in_flight == 60
    assert limit.in_flight == 0
    err = info.value
    assert err.retry_after == 2
    assert err.extra == {"worker_pixels": 60, "max_worker_pixels": 100}


def test_a_failed_block_gives_its_pixels_back():
    limit = WorkerPixelLimit(100, retry_after_s=1)
    with pytest.raises(ValueError), limit.reserve(100):
        raise ValueError("decode failed")
    with limit.reserve(100):
        assert limit.in_flight == 100


def test_concurrent_reservations_never_pass_the_limit():
    limit = WorkerPixelLimit(10, retry_after_s=1)
    seen, refused = [], []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait(5)
        for _ in range(200):
            try:
                with limit.reserve(3):
                    seen.append(limit.in_flight)
            except DecodeCapacityExceeded:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(seen) + len(refused) == 1600
    assert max(seen) <= 9 and limit.in_flight == 0


# -- the setting -------------------------------------------------------------------------------
def test_setting_is_read_from_the_environment_and_checked():
    assert Settings.from_env(environ={}).max_worker_pixels >= Settings().max_image_pixels
    env = {"IMGSERVE_MAX_WORKER_PIXELS": "50000000"}
    assert Settings.from_env(environ=env).max_worker_pixels == 50_000_000
    # Below the per-image limit an accepted image could never be decoded.
    with pytest.raises(SettingsError, match="MAX_WORKER_PIXELS"):
        Settings.from_env(environ={"IMGSERVE_MAX_WORKER_PIXELS": "1000"})
    with pytest.raises(SettingsError, match="MAX_WORKER_PIXELS"):
        Settings.from_env(environ={}, max_worker_pixels=0, max_image_pixels=1)


def test_a_drafted_phone_jpeg_reserves_only_the_pixels_its_decode_holds(serving_repo: Path):
    """The served classifier decodes JPEGs photo-sized (``decode_oversample``): a 12 MP
    phone JPEG fits beside other decodes that a 12 MP PNG would not fit beside."""
    from tests.helpers.photos import phone_jpeg

    phone = phone_jpeg()
    header = 4032 * 3024
    flat = png(Image.new("RGB", (2000, 1500), (90, 120, 150)))
    settings = settings_for(
        "embedded", serving_repo, max_worker_pixels=header, max_image_pixels=header
    )
    app = create_app(settings)
    try:
        service = app.extensions["imgserve"]
        mv = service.catalog.version("tiny_classifier", 1)
        assert mv.spec.decode_oversample is not None
        client = app.test_client()
        with service.worker_pixels.reserve(header - 1_000_000):
            response = client.post("/v1/classify", data=phone, content_type="image/jpeg")
            assert response.status_code == 200, response.get_json()
            assert_problem(classify(client, [flat]), 503, "decode_capacity_exceeded")
        assert service.worker_pixels.in_flight == 0
    finally:
        service.close()


# -- REST and gRPC -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited_app(serving_repo: Path):
    settings = settings_for(
        "embedded", serving_repo, max_worker_pixels=LIMIT, max_image_pixels=LIMIT, retry_after_s=3
    )
    app = create_app(settings)
    yield app
    app.extensions["imgserve"].close()


def classify(client, images: list[bytes]):
    data = {"image": [(io.BytesIO(b), f"{i}.png", "image/png") for i, b in enumerate(images)]}
    return client.post("/v1/classify", data=data)


def test_rest_image_that_does_not_fit_beside_other_decodes_is_503(limited_app):
    service = limited_app.extensions["imgserve"]
    client = limited_app.test_client()
    # Another request's decode holding all but a photo's pixels, less one.
    with service.worker_pixels.reserve(LIMIT - PHOTO_PIXELS + 1):
        response = classify(client, [PHOTO])
        doc = assert_problem(response, 503, "decode_capacity_exceeded")
        assert response.headers["Retry-After"] == "3"
        assert doc["max_worker_pixels"] == LIMIT
        assert doc["worker_pixels"] == LIMIT - PHOTO_PIXELS + 1
    assert service.worker_pixels.in_flight == 0
    # The same image once the other decode is done; two photos fit one after another.
    assert classify(client, [PHOTO]).status_code == 200
    assert len(classify(client, [PHOTO, PHOTO]).get_json()["predictions"]) == 2


def test_grpc_image_that_does_not_fit_is_unavailable(limited_app):
    service = limited_app.extensions["imgserve"]
    server = GrpcGateway(service, "127.0.0.1:0", max_workers=4).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = imgserve_pb2_grpc.ImageServiceStub(channel)
            request = imgserve_pb2.ClassifyRequest(images=[PHOTO])
            with service.worker_pixels.reserve(LIMIT), pytest.raises(grpc.RpcError) as info:
                stub.Classify(request, timeout=10)
            assert len(stub.Classify(request, timeout=10).predictions) == 1
    finally:
        server.stop(grace=1)
    trailing = dict(info.value.trailing_metadata() or ())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert trailing["problem-code"] == "decode_capacity_exceeded"


# -- a flood under gunicorn ----------------------------------------------------------------------
def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


#: Flat 6000x6000: 36 M pixels, under the per-image limit (40 M), about 100 KB as PNG.
BIG = 6000 * 6000
#: Concurrent requests of the flood: each would hold its own decode without the limit.
CONCURRENCY = 12


def flood(url: str, big: bytes, deadline_s: float) -> tuple[Counter, float, float]:
    """48 requests, CONCURRENCY at a time, every fourth of two images (over the 64 M
    request budget): (statuses, slowest seconds, wall seconds)."""

    def send(i: int) -> tuple[int, float]:
        images = [big, big] if i % 4 == 0 else [big]
        files = [("image", (f"{j}.png", b, "image/png")) for j, b in enumerate(images)]
        t0 = time.monotonic()
        r = requests.post(
            url + "/v1/classify",
            files=files,
            headers={"X-Request-Timeout": str(deadline_s)},
            timeout=60,
        )
        return r.status_code, time.monotonic() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(send, range(48)))
    wall = time.monotonic() - t0
    return Counter(s for s, _ in results), max(s for _, s in results), wall


@pytest.mark.slow
def test_flood_of_6000x6000_pngs_is_bounded_in_status_time_and_memory(serving_repo, tmp_path):
    big = png(Image.new("RGB", (6000, 6000), (40, 90, 160)))
    assert len(big) < 200_000
    # One worker, 128 threads (the default): the limit, not the thread count, bounds decodes.
    # The limit at its least (the per-image limit, 40 M): one of these decodes at a time.
    proc, url, _ = gunicorn(
        serving_repo, tmp_path, workers="1", request_timeout_s="5", max_worker_pixels="40000000"
    )
    try:
        (worker,) = children_of(proc.pid)
        before = _status_kib(worker, "VmRSS")
        statuses, slowest, wall = flood(url, big, 5.0)
        after, peak = _status_kib(worker, "VmRSS"), _status_kib(worker, "VmHWM")
        healthy = requests.get(url + "/healthz", timeout=5).status_code
    finally:
        stop(proc)
    print(
        f"flood: 48 requests of 36 M-pixel PNGs, {CONCURRENCY} at once, {wall:.1f} s, "
        f"statuses {dict(statuses)}, slowest {slowest:.1f} s; worker RSS MiB before "
        f"{before // 1024}, after {after // 1024}, peak {peak // 1024}"
    )
    assert set(statuses) <= {200, 413, 503}, statuses
    assert statuses[413] == 12 and statuses[503] > 0 and statuses[200] > 0
    assert healthy == 200
    # 5 s deadline; a decode in flight when it passes still finishes (about a second).
    assert slowest < 15 and wall < 50
    # One 36 M-pixel decode at a time held 140 MiB over the idle worker; with no limit
    # (IMGSERVE_MAX_WORKER_PIXELS=10**12) the same flood peaked 1790 MiB over it, a 504
    # among the answers and the slowest at 32 s. The bound leaves room for three decodes.
    assert peak - before < 600 * 1024, (before, peak)
