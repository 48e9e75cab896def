"""The error model: statuses, problem documents, gRPC codes, image error mapping."""

from __future__ import annotations

import grpc
import pytest

from contract.preprocessing import ImageDecodeError, ImageTooLargeError, UnusableImageError
from serving import errors


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (errors.UndecodableImage, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InvalidParameter, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.VersionNotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.LabelNotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.TooManyImages, 413, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.UnsupportedMediaType, 415, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.UnusableImage, 422, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Overloaded, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.BackendError, 502, grpc.StatusCode.INTERNAL),
        (errors.BackendUnavailable, 502, grpc.StatusCode.UNAVAILABLE),
        (errors.ServiceUnavailable, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.QueueTimeout, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.BackendTimeout, 504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_status_table(cls, status, code):
    exc = cls("detail")
    assert exc.status == status
    assert errors.grpc_status_of(exc) == code


def test_problem_document_fields():
    exc = errors.Overloaded("queue full", retry_after=2.0, extra={"queue": 5})
    doc = exc.to_problem(instance="/v1/classify", request_id="abc")
    assert doc == {
        "type": errors.PROBLEM_TYPE_BASE + "overloaded",
        "title": "Too many requests",
        "status": 429,
        "detail": "queue full",
        "code": "overloaded",
        "instance": "/v1/classify",
        "request_id": "abc",
        "queue": 5,
    }


@pytest.mark.parametrize(
    ("exc", "status"),
    [(ImageDecodeError("x"), 400), (ImageTooLargeError("x"), 413), (UnusableImageError("x"), 422)],
)
def test_image_errors_keep_their_status(exc, status):
    mapped = errors.from_image_error(exc, index=2)
    assert mapped.status == status
    assert mapped.extra == {"image_index": 2}
    assert mapped.detail.startswith("image 2: ")
