"""The TF Serving gRPC channel recovers fast after an outage (bounded reconnect backoff)."""

from __future__ import annotations

import time

import pytest

from serving.app import create_app
from tests.helpers.gateway import settings_for
from tests.helpers.servers import free_port, wait_for
from tests.helpers.tfserving_standin import TFServingStandIn

#: Long enough for gRPC's default backoff (x1.6 per attempt, up to 120 s) to grow past
#: 5 s, so the test fails without the bounds; short enough to keep the test under 40 s.
OUTAGE_S = 20.0
RECOVERY_S = 5.0


@pytest.mark.slow
def test_requests_succeed_within_5s_of_tf_serving_returning(serving_repo, images):
    port = free_port()
    server = TFServingStandIn(serving_repo, grpc_port=port).start()
    app = create_app(settings_for("tfserving-grpc", serving_repo, server, poll_interval_s=0.5))
    client = app.test_client()

    def classify() -> int:
        return client.post("/v1/classify", data=images["png"], content_type="image/png").status_code

    try:
        assert classify() == 200
        server.stop()
        # Traffic during the outage: every failed connect attempt grows gRPC's backoff.
        end = time.monotonic() + OUTAGE_S
        while time.monotonic() < end:
            assert classify() in (502, 503)
            time.sleep(0.2)
        server = TFServingStandIn(serving_repo, grpc_port=port).start()
        back = time.monotonic()
        assert wait_for(
            lambda: classify() == 200 and client.get("/readyz").status_code == 200,
            timeout=RECOVERY_S,
        ), f"no 200 within {RECOVERY_S} s of TF Serving returning"
        print(f"recovered {time.monotonic() - back:.2f} s after TF Serving returned")
        # Steady, not a lucky one: the following requests all succeed.
        assert [classify() for _ in range(20)] == [200] * 20
    finally:
        app.extensions["imgserve"].close()
        server.stop()
