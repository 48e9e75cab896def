"""Every error leaves the REST API as ``application/problem+json``.

One handler renders :class:`serving.errors.ServingError`; Werkzeug's own HTTP
errors (unknown route, wrong method, body over ``MAX_CONTENT_LENGTH``, broken
multipart) are converted to the same shape; anything else is a gateway bug,
logged with its traceback and answered as a 500 without one.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, json, request
from werkzeug.exceptions import HTTPException

from serving.errors import (
    PROBLEM_JSON,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServingError,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)

_FROM_WERKZEUG: dict[int, type[ServingError]] = {
    400: BadRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def problem_response(error: ServingError) -> Response:
    """Render ``error`` as a problem document with its status and Retry-After."""
    request_id = getattr(g, "request_id", None)
    doc = error.to_problem(instance=request.path, request_id=request_id)
    response = Response(json.dumps(doc), status=error.status, mimetype=PROBLEM_JSON)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return response


def _http_exception(exc: HTTPException) -> Response:
    cls = _FROM_WERKZEUG.get(exc.code or 500)
    if cls is None:
        error = ServingError(exc.description or exc.name)
        error.status = exc.code or 500
        error.title = exc.name
        error.code = exc.name.lower().replace(" ", "_")
    else:
        detail = exc.description or exc.name
        if exc.code == 413:
            detail = "request body is larger than the limit"
        error = cls(detail)
    response = problem_response(error)
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    request_id = getattr(g, "request_id", "")
    return problem_response(ServingError(f"internal error (request id {request_id})"))


def init_app(app: Flask) -> None:
    """Register the problem+json handlers."""
    app.register_error_handler(ServingError, problem_response)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _unexpected)
