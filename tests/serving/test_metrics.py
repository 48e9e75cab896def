"""Metrics, asserted by parsing the real ``/metrics`` text; ``promtool check metrics`` on a scrape."""

from __future__ import annotations

import io

import pytest

from serving.app import create_app
from tests.helpers.gateway import settings_for
from tests.helpers.metrics_text import parse, promtool_check, value

STAGES = ("decode", "preprocess", "queue", "predict", "postprocess")


@pytest.fixture(scope="module")
def metrics_app(serving_repo):
    """A fresh app: its registry starts at zero."""
    app = create_app(settings_for("embedded", serving_repo))
    yield app
    app.extensions["imgserve"].close()


def test_request_metrics_follow_real_traffic(metrics_app, images):
    client = metrics_app.test_client()
    png = images["png"]
    assert client.post("/v1/classify", data=png, content_type="image/png").status_code == 200
    files = {"image": [(io.BytesIO(png), "a"), (io.BytesIO(images["jpeg"]), "b")]}
    assert client.post("/v1/classify", data=files).status_code == 200
    assert client.post("/v1/classify", data=b"junk", content_type="image/png").status_code == 400
    assert (
        client.post("/v1/classify?model=nope", data=png, content_type="image/png").status_code
        == 404
    )
    assert client.post("/v1/detect", data=png, content_type="image/png").status_code == 200
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert client.get(path).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    m = parse(text)

    cls = {"endpoint": "/v1/classify", "model": "tiny_classifier"}
    assert value(m, "imgserve_requests_total", code="200", **cls) == 2
    assert value(m, "imgserve_requests_total", code="400", **cls) == 1
    # An unknown model name is not a label value (bounded cardinality).
    assert value(m, "imgserve_requests_total", endpoint="/v1/classify", model="", code="404") == 1
    assert (
        value(
            m, "imgserve_requests_total", endpoint="/v1/detect", model="tiny_detector", code="200"
        )
        == 1
    )
    # Probes, scrapes and the API document are not requests.
    endpoints = {s.labels["endpoint"] for s in m["imgserve_requests"]}
    assert endpoints == {"/v1/classify", "/v1/detect"}
    assert value(m, "imgserve_request_duration_seconds_count", **cls) == 3
    assert value(m, "imgserve_images_total", model="tiny_classifier") == 3
    assert value(m, "imgserve_images_total", model="tiny_detector") == 1
    for stage in STAGES:
        assert (
            value(m, "imgserve_stage_duration_seconds_count", stage=stage, model="tiny_classifier")
            == 2
        )
        assert (
            value(m, "imgserve_stage_duration_seconds_sum", stage=stage, model="tiny_classifier")
            >= 0
        )
    assert value(m, "imgserve_batch_size_sum", model="tiny_classifier") == 3
    assert value(m, "imgserve_batch_size_count", model="tiny_classifier") in (1, 2)
    assert value(m, "imgserve_inflight_requests") == 0
    assert value(m, "imgserve_queue_depth", model="tiny_classifier") == 0
    # One process without a multiprocess directory: 1 of 1, ready.
    assert value(m, "imgserve_ready_processes") == value(m, "imgserve_configured_processes") == 1
    assert (
        value(
            m, "imgserve_model_version_info", model="tiny_classifier", version="1", label="stable"
        )
        == 1
    )
    assert (
        value(m, "imgserve_model_version_info", model="tiny_detector", version="1", label="stable")
        == 1
    )


def test_scrape_passes_promtool(metrics_app, images):
    client = metrics_app.test_client()
    client.post("/v1/classify", data=images["png"], content_type="image/png")
    response = client.get("/metrics")
    assert response.mimetype == "text/plain"
    promtool_check(response.get_data(as_text=True))
