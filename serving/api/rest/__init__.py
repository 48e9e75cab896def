"""The REST API: blueprints over the service layer, problem+json errors, request metrics,
request ids in log lines and the access log (:mod:`.access`)."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from serving.api.rest import (
    access,
    admin,
    calibration,
    inference,
    models,
    ops,
    problems,
    tfserving,
    try_it,
    v2,
)
from serving.service import request_id_from

REQUEST_ID_HEADER = "X-Request-ID"
#: Blueprints whose requests are counted in ``imgserve_requests_total`` and friends.
_TRACKED = {"inference", "models", "tfserving", "admin", "calibration", "oip"}


def init_app(app: Flask) -> None:
    """Register blueprints, error handlers and the request id / access log / metrics hooks."""
    blueprints = (
        inference.bp,
        models.bp,
        admin.bp,
        calibration.bp,
        ops.bp,
        try_it.bp,
        v2.bp,
        v2.health_bp,
    )
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    tfserving.init_app(app)
    problems.init_app(app)
    app.before_request(_before)
    app.after_request(_after)
    app.teardown_request(_teardown)


def _tracked() -> bool:
    return request.blueprint in _TRACKED and request.url_rule is not None


def _before() -> None:
    g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    access.begin(g.request_id)
    if _tracked():
        g.metric_start = time.perf_counter()
        g.metric_model = ""
        inference.service().metrics.inflight.inc()


def _after(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    start = g.pop("metric_start", None)
    if start is not None:
        metrics = inference.service().metrics
        endpoint = request.url_rule.rule if request.url_rule else request.path
        model = g.get("metric_model", "")
        metrics.requests.labels(endpoint, model, str(response.status_code)).inc()
        metrics.request_duration.labels(endpoint, model).observe(time.perf_counter() - start)
        metrics.inflight.dec()
    access.finish(response, inference.service().settings)
    return response


def _teardown(exc: BaseException | None) -> None:
    access.end()
    # after_request did not run (the response never formed): still release the gauge.
    if g.pop("metric_start", None) is not None:
        inference.service().metrics.inflight.dec()
