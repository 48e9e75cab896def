"""Hostile request bodies and parameters: deep JSON nesting and repeated parameters answer 400."""

from __future__ import annotations

import io
import logging

import pytest

from serving.api.rest.payload import MAX_JSON_DEPTH
from serving.app import create_app
from tests.helpers.gateway import settings_for
from tests.helpers.problems import assert_problem

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def admin_app(serving_repo, tmp_path_factory):
    """Embedded backend with a capture store and the admin endpoints enabled."""
    tmp = tmp_path_factory.mktemp("payload")
    settings = settings_for(
        "embedded",
        serving_repo,
        capture_dir=str(tmp / "samples"),
        state_dir=str(tmp / "state"),
        admin_token=TOKEN,
    )
    app = create_app(settings)
    yield app
    app.extensions["imgserve"].close()


def nested(levels: int, key: str) -> bytes:
    """``{"<key>": [[[...]]]}`` with ``levels`` nested lists: about 2 KB for 1,000 levels."""
    return b'{"' + key.encode() + b'": ' + b"[" * levels + b"]" * levels + b"}"


DEEP_CASES = [
    ("/v1/classify", "instances", {}),
    ("/v1/detect", "instances", {}),
    ("/v1/feedback", "labels", {}),
    ("/v1/admin/calibrations", "model", AUTH),
]


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 1_000, 100_000])
@pytest.mark.parametrize(("path", "key", "headers"), DEEP_CASES, ids=[c[0] for c in DEEP_CASES])
def test_deeply_nested_json_is_a_400_without_a_logged_traceback(
    admin_app, caplog, path, key, headers, levels
):
    client = admin_app.test_client()
    body = nested(levels, key)
    with caplog.at_level(logging.DEBUG):
        r = client.post(path, data=body, content_type="application/json", headers=headers)
    doc = assert_problem(r, 400, "bad_request")
    assert "nested" in doc["detail"] and str(MAX_JSON_DEPTH) in doc["detail"]
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


def test_nesting_up_to_the_bound_is_parsed(admin_app):
    # One level of the bound is the object itself; the deepest allowed list nest is
    # then refused for what it is (not b64 instances), not for its depth.
    r = admin_app.test_client().post(
        "/v1/classify",
        data=nested(MAX_JSON_DEPTH - 1, "instances"),
        content_type="application/json",
    )
    doc = assert_problem(r, 400, "bad_request")
    assert "nested" not in doc["detail"]


@pytest.mark.parametrize(
    "query", ["?top_k=1&top_k=5", "?top_k=1&top_k=1", "?model=a&model=b", "?label=x&label=x"]
)
def test_repeated_query_parameters_are_refused(admin_app, query):
    r = admin_app.test_client().post(
        "/v1/classify" + query, data=b"\x89PNG", content_type="image/png"
    )
    doc = assert_problem(r, 400, "invalid_parameter")
    assert "more than once" in doc["detail"]


def test_repeated_form_fields_are_refused(admin_app):
    data = {"image": (io.BytesIO(b"\x89PNG"), "a.png"), "top_k": ["1", "5"]}
    r = admin_app.test_client().post("/v1/classify", data=data, content_type="multipart/form-data")
    doc = assert_problem(r, 400, "invalid_parameter")
    assert "more than once" in doc["detail"]


def test_too_many_multipart_parts_says_so(admin_app):
    limit = admin_app.config["MAX_FORM_PARTS"]
    fields = {"image": (io.BytesIO(b"\x89PNG"), "a.png")}
    fields.update({f"f{i}": "x" for i in range(limit + 5)})
    r = admin_app.test_client().post(
        "/v1/classify", data=fields, content_type="multipart/form-data"
    )
    doc = assert_problem(r, 413, "too_many_parts")
    assert "too many parts" in doc["detail"] and str(limit) in doc["detail"]
    assert "body" not in doc["detail"]


def test_multipart_within_the_part_limit_is_parsed(admin_app):
    # Counting parts must not consume the body the form parser reads afterwards.
    data = {"image": (io.BytesIO(b"\x89PNG"), "a.png"), "bogus": "1"}
    r = admin_app.test_client().post("/v1/classify", data=data, content_type="multipart/form-data")
    doc = assert_problem(r, 400, "invalid_parameter")
    assert "bogus" in doc["detail"]


def test_401_names_the_bearer_scheme(admin_app):
    client = admin_app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
        r = client.post("/v1/admin/reload", headers=headers)
        assert_problem(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "WWW-Authenticate" not in client.post("/v1/admin/reload", headers=AUTH).headers
