"""The decoded-pixel budget and the deadline between decodes, over REST and gRPC.

Header-only PNGs (a real IHDR declaring a large size, a few bytes of pixel data)
show the order of the checks without mocks: decoding one is a 400 (truncated), so a
413 ``too_many_pixels`` for a request of them proves no image was decoded first.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
from PIL import Image

from serving.api.grpc.server import GrpcGateway
from serving.app import create_app
from serving.errors import ImageRejected, TooManyPixels
from serving.proto import imgserve_pb2, imgserve_pb2_grpc
from serving.service.pixel_budget import check_pixel_budget, header_pixels
from tests.helpers.gateway import settings_for
from tests.helpers.photos import photo, photo_sized
from tests.helpers.problems import assert_problem
from tests.helpers.servers import children_of, gunicorn, stop


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width x height`` pixels, with almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# scikit-image's chelsea (451x300): a photograph no one here made.
PHOTO = png(photo("chelsea.png").convert("RGB"))
PHOTO_PIXELS = 451 * 300
#: Two photos fit exactly; one pixel more does not.
BUDGET = 2 * PHOTO_PIXELS


@pytest.fixture(scope="module")
def budget_app(serving_repo: Path):
    app = create_app(settings_for("embedded", serving_repo, max_request_pixels=BUDGET))
    yield app
    app.extensions["imgserve"].close()


@pytest.fixture(scope="module")
def budget_stub(budget_app):
    server = GrpcGateway(budget_app.extensions["imgserve"], "127.0.0.1:0", max_workers=4).start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield imgserve_pb2_grpc.ImageServiceStub(channel)
    server.stop(grace=1)


def multipart(client, images: list[bytes], **headers: str):
    data = {"image": [(io.BytesIO(b), f"{i}.png", "image/png") for i, b in enumerate(images)]}
    return client.post("/v1/classify", data=data, headers=headers)


# -- the budget on its own -------------------------------------------------------------------
def test_header_pixels_reads_the_size_without_decoding():
    assert Image.open(io.BytesIO(PHOTO)).size == (451, 300)
    assert header_pixels(PHOTO, None, 10**9) == PHOTO_PIXELS
    # 30000 x 30000 = 900 M pixels declared in 80 bytes: read in well under a decode's time.
    bomb = header_only_png(30_000, 30_000)
    t0 = time.perf_counter()
    with pytest.raises(ImageRejected) as info:
        header_pixels(bomb, 3, 40_000_000)
    assert time.perf_counter() - t0 < 0.5
    assert info.value.code == "image_too_large" and info.value.extra == {"image_index": 3}
    # Not an image: counted 0 here, the decode reports it as that image's 400.
    assert header_pixels(b"not an image", None, 10**9) == 0


def test_budget_sums_over_the_request():
    assert check_pixel_budget([PHOTO, PHOTO], max_request_pixels=BUDGET, max_image_pixels=10**9)
    with pytest.raises(TooManyPixels) as info:
        check_pixel_budget(
            [PHOTO, PHOTO, header_only_png(1, 1)],
            max_request_pixels=BUDGET,
            max_image_pixels=10**9,
        )
    assert info.value.extra == {"request_pixels": BUDGET + 1, "max_request_pixels": BUDGET}


# -- REST ----------------------------------------------------------------------------------
def test_rest_request_at_the_budget_is_served(budget_app):
    response = multipart(budget_app.test_client(), [PHOTO, PHOTO])
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(response.get_json()["predictions"]) == 2


def test_rest_request_over_the_budget_is_413(budget_app):
    client = budget_app.test_client()
    doc = assert_problem(multipart(client, [PHOTO, PHOTO, png(Image.new("RGB", (1, 1)))]), 413)
    assert doc["code"] == "too_many_pixels"
    assert doc["request_pixels"] == BUDGET + 1 and doc["max_request_pixels"] == BUDGET


def test_rest_budget_is_checked_before_any_decode(budget_app):
    client = budget_app.test_client()
    # Each alone is under the budget and would decode to a 400 (truncated pixel data)...
    half = header_only_png(451, 201)
    assert_problem(multipart(client, [half]), 400, "undecodable_image")
    # ... so together they are refused on their headers, never decoded.
    doc = assert_problem(multipart(client, [half, half, half]), 413, "too_many_pixels")
    assert doc["request_pixels"] == 3 * 451 * 201


def test_deadline_is_checked_between_decodes(serving_repo: Path):
    # Six real 2000x1500 photographs (18 M pixels, ~9 MB each as PNG), a 20 ms deadline:
    # one decode alone outlasts it, and the request stops instead of decoding the rest.
    big = png(photo_sized("chelsea.png", 2000, 1500))
    app = create_app(settings_for("embedded", serving_repo, max_body_bytes=100_000_000))
    try:
        t0 = time.perf_counter()
        response = multipart(app.test_client(), [big] * 6, **{"X-Request-Timeout": "0.02"})
        elapsed = time.perf_counter() - t0
    finally:
        app.extensions["imgserve"].close()
    doc = assert_problem(response, 503, "preprocess_timeout")
    assert response.headers["Retry-After"]
    decoded = int(doc["detail"].split("after ")[1].split(" of")[0])
    assert decoded < 6, doc["detail"]
    print(f"deadline 0.02 s: answered after {elapsed:.2f} s, {decoded} of 6 images decoded")


# -- gRPC ----------------------------------------------------------------------------------
def test_grpc_request_over_the_budget_is_413_before_decoding(budget_stub):
    half = header_only_png(451, 201)
    request = imgserve_pb2.ClassifyRequest(images=[half, half, half])
    with pytest.raises(grpc.RpcError) as info:
        budget_stub.Classify(request, timeout=10)
    err = info.value
    trailing = dict(err.trailing_metadata() or ())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing["http-status"] == "413" and trailing["problem-code"] == "too_many_pixels"


def test_grpc_request_at_the_budget_is_served(budget_stub):
    response = budget_stub.Classify(imgserve_pb2.ClassifyRequest(images=[PHOTO, PHOTO]), timeout=10)
    assert len(response.predictions) == 2


# -- a flood under gunicorn --------------------------------------------------------------------
def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_flood_of_large_pngs_gets_only_200_413_503_within_the_deadline(serving_repo, tmp_path):
    # Flat 4000x3000 PNGs: 12 M pixels each in a few kilobytes, the cheapest bomb to send.
    flat = png(Image.new("RGB", (4000, 3000), (40, 90, 160)))
    within = [flat] * 4  # 48 M: under the default 64 M budget, decoded
    over = [flat] * 6  # 72 M: refused on the headers
    proc, url, log = gunicorn(
        serving_repo, tmp_path, workers="2", threads="8", request_timeout_s="5"
    )
    try:
        workers = children_of(proc.pid)

        def send(i: int) -> tuple[int, float]:
            files = [
                ("image", (f"{j}.png", b, "image/png"))
                for j, b in enumerate(over if i % 3 == 0 else within)
            ]
            t0 = time.monotonic()
            r = requests.post(url + "/v1/classify", files=files, timeout=30)
            return r.status_code, time.monotonic() - t0

        t0 = time.monotonic()
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(send, range(48)))
        wall = time.monotonic() - t0
        rss = {pid: (_rss_kib(pid, "VmRSS"), _rss_kib(pid, "VmHWM")) for pid in workers}
    finally:
        stop(proc)
    statuses = Counter(status for status, _ in results)
    slowest = max(seconds for _, seconds in results)
    print(
        f"flood: 48 requests, 24 at once, {wall:.1f} s, statuses {dict(statuses)}, "
        f"slowest {slowest:.1f} s, worker RSS/peak MiB "
        f"{ {p: (a // 1024, b // 1024) for p, (a, b) in rss.items()} }"
    )
    assert set(statuses) <= {200, 413, 503}, statuses
    assert statuses[413] >= 16  # every third request is over the budget
    # 5 s deadline; a decode in flight when it passes still finishes, plus queueing in gunicorn.
    assert slowest < 20 and wall < 55
