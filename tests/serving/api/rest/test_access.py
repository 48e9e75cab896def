"""The access line and the request id bound while a request is served (``serving.api.rest.access``).

A bare Flask app with the module's three hooks, so each switch is seen alone; the
whole gateway under gunicorn: tests/serving/test_logging.py.
"""

from __future__ import annotations

import logging

import pytest
from flask import Flask, request

from serving.api.rest import access
from serving.settings import Settings
from tests.helpers.log_lines import captured_lines


def make_app(settings: Settings) -> Flask:
    app = Flask("access_test")
    app.before_request(lambda: access.begin(request.headers.get("X-Request-ID", "fresh-id")))

    @app.after_request
    def after(response):
        access.finish(response, settings)
        return response

    app.teardown_request(lambda exc: access.end())

    @app.post("/v1/echo")
    def echo():
        logging.getLogger("tests.view").info("echoing %d bytes", len(request.data))
        return request.data, 201

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def test_one_access_line_per_request_and_the_id_on_every_line_meanwhile():
    client = make_app(Settings.from_env(environ={})).test_client()
    with captured_lines() as lines:
        client.post("/v1/echo", data=b"abcd", headers={"X-Request-ID": "id-1", "User-Agent": "t/1"})
        logging.getLogger("tests.after").info("between requests")
    view, line, between = lines
    assert (view["logger"], view["message"], view["request_id"]) == (
        "tests.view",
        "echoing 4 bytes",
        "id-1",
    )
    assert line["logger"] == "serving.access" and line["message"] == "POST /v1/echo 201"
    assert {k: line[k] for k in ("method", "path", "status", "bytes", "user_agent")} == {
        "method": "POST",
        "path": "/v1/echo",
        "status": 201,
        "bytes": 4,
        "user_agent": "t/1",
    }
    assert line["request_id"] == "id-1" and line["duration_ms"] >= 0
    assert line["remote_addr"] == "127.0.0.1"
    assert "request_id" not in between  # unbound at teardown


@pytest.mark.parametrize(
    ("env", "logged"),
    [
        ({}, ["/v1/echo"]),
        ({"IMGSERVE_ACCESS_LOG_PROBES": "1"}, ["/v1/echo", "/healthz"]),
        ({"IMGSERVE_ACCESS_LOG": "0"}, []),
    ],
)
def test_probes_and_the_whole_access_log_are_switches(env, logged):
    client = make_app(Settings.from_env(environ=env)).test_client()
    with captured_lines() as lines:
        client.post("/v1/echo", data=b"x")
        client.get("/healthz")
    assert [x["path"] for x in lines if x["logger"] == "serving.access"] == logged


def test_the_access_line_is_info_and_kept_when_the_level_is_warning():
    client = make_app(Settings.from_env(environ={})).test_client()
    with captured_lines(level=logging.WARNING) as lines:
        client.post("/v1/echo", data=b"x")
    assert [x["logger"] for x in lines] == ["serving.access"]
