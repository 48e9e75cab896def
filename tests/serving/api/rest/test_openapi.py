"""The OpenAPI document validates and describes exactly the app's routes."""

from __future__ import annotations

import re

import yaml
from openapi_spec_validator import validate

from serving.api.rest.ops import OPENAPI_PATH


def test_document_is_valid_openapi():
    validate(yaml.safe_load(OPENAPI_PATH.read_text()))


def test_document_and_routes_agree(embedded_app):
    doc = yaml.safe_load(OPENAPI_PATH.read_text())
    documented = {(path, method.upper()) for path, item in doc["paths"].items() for method in item}
    routes = set()
    for rule in embedded_app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        routes |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == routes


def test_served_document_is_the_file(client):
    assert client.get("/openapi.json").get_json() == yaml.safe_load(OPENAPI_PATH.read_text())
    assert client.get("/openapi.yaml").get_data(as_text=True) == OPENAPI_PATH.read_text()
