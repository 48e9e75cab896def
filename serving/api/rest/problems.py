"""Every error leaves the REST API as ``application/problem+json``.

One handler renders every exception the error table (:mod:`serving.api.errors`)
knows: the gateway's own errors, the domain errors of ``contract`` and
``calibration``, and Werkzeug's HTTP errors (unknown route, wrong method, body
over ``MAX_CONTENT_LENGTH``, broken multipart). Anything else is a gateway bug,
logged with its traceback and answered as a 500 without one. Every other problem is
logged in one line (code and detail), with the request's id like every line logged
while serving it.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, json, request
from werkzeug.exceptions import MethodNotAllowed

from serving.api import errors
from serving.errors import ServingError, Unauthorized

log = logging.getLogger(__name__)


def problem_response(
    exc: Exception, *, status: int | None = None, error_member: bool = False
) -> Response:
    """Render ``exc`` as a problem document with its status, Retry-After and Allow headers.

    ``status`` replaces the table's (a protocol with its own status rules, TF
    Serving's); ``error_member`` adds the detail as ``error``, the member TF
    Serving's clients read.
    """
    if errors.resolve(exc) is None:
        log.exception("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        exc = ServingError(f"internal error (request id {getattr(g, 'request_id', '')})")
    hidden = errors.hidden_detail(exc)
    if hidden is not None:
        # The client's detail is fixed (no backend address, no gRPC internals): keep the
        # real cause here, findable by the request id the client was given.
        log.warning(
            "%s %s (request id %s): %s",
            request.method,
            request.path,
            getattr(g, "request_id", ""),
            hidden,
        )
    doc = errors.problem(exc, instance=request.path, request_id=getattr(g, "request_id", None))
    if hidden is None and doc["status"] != 500:
        # Why the request failed, beside its access line: the client's fault at INFO, the
        # gateway's or its backend's (429, 503, 502, 504) at WARNING.
        log.log(
            logging.INFO if doc["status"] < 500 else logging.WARNING,
            "%s %s: %d %s: %s",
            request.method,
            request.path,
            doc["status"],
            doc.get("code", ""),
            doc.get("detail", ""),
        )
    if status is not None:
        doc["status"] = status
    if error_member:
        doc["error"] = doc["detail"]
    response = Response(json.dumps(doc), status=doc["status"], mimetype=errors.PROBLEM_JSON)
    retry_after = errors.retry_after(exc)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    if isinstance(exc, Unauthorized):
        # RFC 9110: a 401 names the scheme the client must use.
        response.headers["WWW-Authenticate"] = 'Bearer realm="imgserve"'
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _render(exc: Exception) -> Response:
    # Below /v1/models/ the URL space is TF Serving's: a path no route matches (a name
    # with ':', an unknown verb) is answered with TF Serving's `error` member too.
    tf_serving_path = request.url_rule is None and request.path.startswith("/v1/models/")
    return problem_response(exc, error_member=tf_serving_path)


def init_app(app: Flask) -> None:
    """Register the problem+json handler for every exception."""
    app.register_error_handler(Exception, _render)
