"""The gateway's error model: exceptions that carry their HTTP status.

Every failure the gateway reports is a :class:`ServingError` subclass. The REST
layer renders it as ``application/problem+json`` (RFC 9457) and the gRPC layer
maps the same status through :data:`GRPC_STATUS`, so one table decides whose
fault a failure is:

====  ==========================  =========================================
HTTP  gRPC                        meaning
====  ==========================  =========================================
400   INVALID_ARGUMENT            undecodable/truncated image, bad parameter
401   UNAUTHENTICATED             admin endpoint without a valid token
404   NOT_FOUND                   unknown model, version, label or route
405   UNIMPLEMENTED               method not allowed on the route
413   INVALID_ARGUMENT            body, pixel count or image count too large
415   INVALID_ARGUMENT            unsupported media type
422   INVALID_ARGUMENT            decodable but unusable image
429   RESOURCE_EXHAUSTED          batching queue full (with Retry-After)
500   INTERNAL                    a gateway bug (never for client input)
502   UNAVAILABLE / INTERNAL      backend unreachable / backend error
503   UNAVAILABLE                 not ready, shutting down, queue deadline
504   DEADLINE_EXCEEDED           backend did not answer within the deadline
====  ==========================  =========================================
"""

from __future__ import annotations

from typing import Any

import grpc

from contract.preprocessing import ImageError

PROBLEM_JSON = "application/problem+json"
#: Base of the ``type`` URI of each problem; the fragment is the error code.
PROBLEM_TYPE_BASE = "https://imgserve.dev/problems/"


class ServingError(Exception):
    """A failure with a status: ``status`` (HTTP), ``code`` (stable, machine-readable), ``title``."""

    status = 500
    code = "internal_error"
    title = "Internal error"
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        detail: str,
        *,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.extra = dict(extra or {})

    def to_problem(self, instance: str | None = None, request_id: str | None = None) -> dict:
        """The RFC 9457 problem document for this error."""
        doc: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            doc["instance"] = instance
        if request_id:
            doc["request_id"] = request_id
        doc.update(self.extra)
        return doc


class BadRequest(ServingError):
    status, code, title = 400, "bad_request", "Bad request"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidParameter(BadRequest):
    code, title = "invalid_parameter", "Invalid parameter"


class UndecodableImage(BadRequest):
    code, title = "undecodable_image", "Image could not be decoded"


class Unauthorized(ServingError):
    status, code, title = 401, "unauthorized", "Unauthorized"
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(ServingError):
    status, code, title = 404, "not_found", "Not found"
    grpc_code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    code, title = "model_not_found", "Model not found"


class VersionNotFound(NotFound):
    code, title = "version_not_found", "Model version not found"


class LabelNotFound(NotFound):
    code, title = "label_not_found", "Version label not found"


class MethodNotAllowed(ServingError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class PayloadTooLarge(ServingError):
    status, code, title = 413, "payload_too_large", "Payload too large"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ImageTooLarge(PayloadTooLarge):
    code, title = "image_too_large", "Image too large"


class TooManyImages(PayloadTooLarge):
    code, title = "too_many_images", "Too many images"


class UnsupportedMediaType(ServingError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class UnusableImage(ServingError):
    status, code, title = 422, "unusable_image", "Image cannot be used"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(ServingError):
    """The batching queue is full: the request was shed before any work was done."""

    status, code, title = 429, "overloaded", "Too many requests"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BackendError(ServingError):
    """The model backend answered with an error the gateway cannot blame on the client."""

    status, code, title = 502, "backend_error", "Backend error"
    grpc_code = grpc.StatusCode.INTERNAL


class BackendUnavailable(BackendError):
    """The model backend could not be reached."""

    code, title = "backend_unavailable", "Backend unavailable"
    grpc_code = grpc.StatusCode.UNAVAILABLE


class ServiceUnavailable(ServingError):
    """Not ready (no model loaded, backend down at start-up) or shedding load."""

    status, code, title = 503, "unavailable", "Service unavailable"
    grpc_code = grpc.StatusCode.UNAVAILABLE


class QueueTimeout(ServiceUnavailable):
    """The request's deadline passed while it waited for a batch slot."""

    code, title = "queue_timeout", "Deadline passed in the queue"


class BackendTimeout(ServingError):
    status, code, title = 504, "backend_timeout", "Backend deadline exceeded"
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


_IMAGE_ERRORS: dict[int, type[ServingError]] = {
    400: UndecodableImage,
    413: ImageTooLarge,
    422: UnusableImage,
}


def from_image_error(exc: ImageError, index: int | None = None) -> ServingError:
    """Map a ``contract.preprocessing`` image error to the gateway error with the same status."""
    cls = _IMAGE_ERRORS.get(exc.status, BadRequest)
    where = f"image {index}: " if index is not None else ""
    extra = {"image_index": index} if index is not None else None
    return cls(f"{where}{exc}", extra=extra)


def grpc_status_of(error: ServingError) -> grpc.StatusCode:
    """The gRPC status code a :class:`ServingError` is reported with."""
    return error.grpc_code


class Conflict(ServingError):
    status, code, title = 409, "conflict", "Conflict"
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class Gone(ServingError):
    status, code, title = 410, "gone", "Gone"
    grpc_code = grpc.StatusCode.NOT_FOUND


class Unprocessable(ServingError):
    status, code, title = 422, "unprocessable", "Unprocessable content"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
