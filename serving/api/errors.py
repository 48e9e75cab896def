"""The one error table: exception class -> HTTP status, problem code/title, gRPC code.

The REST problem handler and the gRPC servicer both render failures from here, so
one row decides whose fault a failure is and how each protocol says so. An
exception is resolved along its class's MRO: the first class with a row wins.

====  ==========================  =========================================
HTTP  gRPC                        meaning
====  ==========================  =========================================
400   INVALID_ARGUMENT            undecodable/truncated image, bad parameter
401   UNAUTHENTICATED             admin endpoint without a valid token
404   NOT_FOUND                   unknown model, version, label, route, request id, job
405   UNIMPLEMENTED               method not allowed on the route
409   ALREADY_EXISTS              different feedback recorded, calibration running
410   NOT_FOUND                   feedback for a sample that was dropped
413   INVALID_ARGUMENT            body, image count, pixels per image or per request
415   INVALID_ARGUMENT            unsupported media type
422   INVALID_ARGUMENT            decodable but unusable image, unusable feedback
429   RESOURCE_EXHAUSTED          batching queue full (with Retry-After)
500   INTERNAL                    a gateway bug (never for client input)
502   UNAVAILABLE / INTERNAL      backend unreachable / backend error (fixed detail)
503   UNAVAILABLE                 not ready, shutting down, queue or decode deadline
504   DEADLINE_EXCEEDED           backend did not answer within the deadline
====  ==========================  =========================================

Domain errors of ``contract`` and ``calibration`` carry no status of their own;
the rows below give them one. Where a domain error is reported exactly as one of
the gateway's errors (an unknown request id is the gateway's 404 ``not_found``),
its row is that error's row (:func:`_like`), so clients see the same problem code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import grpc
from werkzeug import exceptions as http

from calibration.capture_store import (
    ExpiredRequestError,
    FeedbackConflictError,
    SampleStoreError,
    UnknownRequestError,
)
from calibration.errors import CalibrationError, InvalidOptionError
from calibration.jobs import CalibrationBusy, UnknownJob
from contract.preprocessing import (
    ImageDecodeError,
    ImageError,
    ImageTooLargeError,
    UnusableImageError,
)
from serving.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadRequest,
    Conflict,
    Gone,
    ImageRejected,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PreprocessTimeout,
    ServiceUnavailable,
    ServingError,
    TooManyPixels,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)

PROBLEM_JSON = "application/problem+json"
#: Base of the ``type`` URI of each problem; the fragment is the error code.
PROBLEM_TYPE_BASE = "https://imgserve.dev/problems/"

_CODE = grpc.StatusCode


@dataclass(frozen=True)
class Entry:
    """How one error class is reported.

    ``code``/``title``: the problem's; None takes the exception's own ``code`` and
    ``title`` (so a subclass without a row of its own keeps its name). ``detail``:
    a fixed detail replacing the exception's text (Werkzeug's is written for HTML).
    """

    status: int
    grpc_code: grpc.StatusCode
    code: str | None = None
    title: str | None = None
    detail: str | None = None


def _like(cls: type[ServingError]) -> Entry:
    """The row of ``cls`` (or of its nearest mapped base) with its code and title fixed:
    report another class exactly as it."""
    row = entry_for(cls)
    assert row is not None, cls
    return replace(row, code=cls.code, title=cls.title)


def entry_for(cls: type[BaseException]) -> Entry | None:
    """The row of the first class in ``cls``'s MRO that has one; None for an unmapped class."""
    for klass in cls.__mro__:
        row = TABLE.get(klass)
        if row is not None:
            return row
    return None


TABLE: dict[type[BaseException], Entry] = {
    # The gateway's own errors; subclasses (ModelNotFound, TooManyImages, QueueTimeout...)
    # share their base's status under their own code.
    ServingError: Entry(500, _CODE.INTERNAL),
    BadRequest: Entry(400, _CODE.INVALID_ARGUMENT),
    Unauthorized: Entry(401, _CODE.UNAUTHENTICATED),
    NotFound: Entry(404, _CODE.NOT_FOUND),
    MethodNotAllowed: Entry(405, _CODE.UNIMPLEMENTED),
    Conflict: Entry(409, _CODE.ALREADY_EXISTS),
    Gone: Entry(410, _CODE.NOT_FOUND),
    PayloadTooLarge: Entry(413, _CODE.INVALID_ARGUMENT),
    # The request's decoded-pixel budget: the client asked for too much work at once.
    TooManyPixels: Entry(413, _CODE.INVALID_ARGUMENT),
    UnsupportedMediaType: Entry(415, _CODE.INVALID_ARGUMENT),
    Unprocessable: Entry(422, _CODE.INVALID_ARGUMENT),
    Overloaded: Entry(429, _CODE.RESOURCE_EXHAUSTED),
    # Backend failures: the client sees a fixed detail; the backend's address and its
    # gRPC/HTTP internals go to the gateway's log (hidden_detail) under the request id.
    BackendError: Entry(502, _CODE.INTERNAL, detail="the model backend failed"),
    BackendUnavailable: Entry(
        502, _CODE.UNAVAILABLE, detail="the model backend is unreachable; retry later"
    ),
    ServiceUnavailable: Entry(503, _CODE.UNAVAILABLE),
    # The deadline ran out between decodes: like a queue timeout, the gateway is busy
    # (503 + Retry-After), not the backend's fault (504).
    PreprocessTimeout: Entry(503, _CODE.UNAVAILABLE),
    BackendTimeout: Entry(
        504, _CODE.DEADLINE_EXCEEDED, detail="the model backend did not answer within the deadline"
    ),
    # contract.preprocessing: the client's image (reached through ImageRejected).
    ImageError: Entry(400, _CODE.INVALID_ARGUMENT),
    ImageDecodeError: Entry(400, _CODE.INVALID_ARGUMENT),
    ImageTooLargeError: Entry(413, _CODE.INVALID_ARGUMENT),
    UnusableImageError: Entry(422, _CODE.INVALID_ARGUMENT),
}
TABLE.update(
    {
        # calibration.capture_store: feedback on a captured request.
        SampleStoreError: _like(Unprocessable),
        UnknownRequestError: _like(NotFound),
        ExpiredRequestError: _like(Gone),
        FeedbackConflictError: _like(Conflict),
        # calibration.errors: a run that cannot go ahead as asked (not enough samples,
        # no stable version, a label move that cannot be made).
        CalibrationError: _like(Unprocessable),
        InvalidOptionError: _like(InvalidParameter),
        # calibration.jobs (CoolingDown is a CalibrationBusy).
        CalibrationBusy: _like(Conflict),
        UnknownJob: _like(NotFound),
        # Werkzeug's own HTTP errors: unknown route, wrong method, body over
        # MAX_CONTENT_LENGTH, broken multipart. Other HTTPExceptions: see _werkzeug.
        http.BadRequest: _like(BadRequest),
        http.NotFound: _like(NotFound),
        http.MethodNotAllowed: _like(MethodNotAllowed),
        http.RequestEntityTooLarge: replace(
            _like(PayloadTooLarge), detail="request body is larger than the limit"
        ),
        http.UnsupportedMediaType: _like(UnsupportedMediaType),
    }
)


def _werkzeug(exc: http.HTTPException) -> Entry:
    """A Werkzeug HTTP error without a row: its own status and name (never seen over gRPC)."""
    status = exc.code or 500
    return Entry(status, _CODE.UNKNOWN, exc.name.lower().replace(" ", "_"), exc.name)


def resolve(exc: BaseException) -> Entry | None:
    """The row ``exc`` is reported with; None when it is not an expected failure (a bug)."""
    if isinstance(exc, ImageRejected):
        return entry_for(type(exc.error))
    row = entry_for(type(exc))
    if row is None and isinstance(exc, http.HTTPException):
        return _werkzeug(exc)
    return row


def _resolved(exc: BaseException) -> Entry:
    row = resolve(exc)
    return row if row is not None else TABLE[ServingError]


def http_status(exc: BaseException) -> int:
    """The HTTP status of ``exc`` (500 for an unmapped exception)."""
    return _resolved(exc).status


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of ``exc`` (INTERNAL for an unmapped exception)."""
    return _resolved(exc).grpc_code


def problem_code(exc: BaseException) -> str:
    """The problem's machine-readable ``code`` (the ``problem-code`` gRPC trailer)."""
    row = _resolved(exc)
    return row.code or getattr(exc, "code", ServingError.code)


def detail(exc: BaseException) -> str:
    """The human-readable detail a client sees (the gRPC status details)."""
    row = _resolved(exc)
    if row.detail is not None:
        return row.detail
    if isinstance(exc, ServingError):
        return exc.detail
    if isinstance(exc, http.HTTPException):
        return exc.description or exc.name
    return str(exc)


def hidden_detail(exc: BaseException) -> str | None:
    """The gateway's own detail of ``exc`` when the client is shown a fixed one (for the log)."""
    row = _resolved(exc)
    if row.detail is not None and isinstance(exc, ServingError) and exc.detail != row.detail:
        return exc.detail
    return None


def retry_after(exc: BaseException) -> str | None:
    """The Retry-After value (whole seconds, at least 1), or None when there is none."""
    seconds = exc.retry_after if isinstance(exc, ServingError) else None
    return None if seconds is None else str(max(1, round(seconds)))


def problem(
    exc: BaseException, instance: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """The RFC 9457 problem document for ``exc``."""
    row = _resolved(exc)
    code = problem_code(exc)
    doc: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": row.title or getattr(exc, "title", ServingError.title),
        "status": row.status,
        "detail": detail(exc),
        "code": code,
    }
    if instance:
        doc["instance"] = instance
    if request_id:
        doc["request_id"] = request_id
    if isinstance(exc, ServingError):
        doc.update(exc.extra)
    return doc
