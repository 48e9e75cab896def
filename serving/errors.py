"""The gateway's own errors: what went wrong, with the detail a client sees.

Every failure the gateway itself reports is a :class:`ServingError` subclass with
a stable ``code`` and a ``title``; an instance adds the ``detail``, an optional
``retry_after`` (seconds) and ``extra`` members for the problem document. Which
HTTP status and gRPC code each class (and each domain error of ``contract`` and
``calibration``) is reported with is decided in one place, the table in
:mod:`serving.api.errors`.
"""

from __future__ import annotations

from typing import Any

from contract.preprocessing import ImageError


class ServingError(Exception):
    """A gateway failure: ``code`` (stable, machine-readable), ``title``, and a ``detail``."""

    code = "internal_error"
    title = "Internal error"

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


class BadRequest(ServingError):
    code, title = "bad_request", "Bad request"


class InvalidParameter(BadRequest):
    code, title = "invalid_parameter", "Invalid parameter"


class ImageRejected(ServingError):
    """An image of the request failed preprocessing; it is reported as that image error.

    ``error`` is the :class:`contract.preprocessing.ImageError`: the error table
    resolves this exception by the image error's class (its status, code and
    title), while the detail and ``image_index`` say which image of a batch it was.
    """

    def __init__(self, error: ImageError, index: int | None = None) -> None:
        where = f"image {index}: " if index is not None else ""
        extra = {"image_index": index} if index is not None else None
        super().__init__(f"{where}{error}", extra=extra)
        self.error = error
        self.code, self.title = error.code, error.title


class Unauthorized(ServingError):
    code, title = "unauthorized", "Unauthorized"


class NotFound(ServingError):
    code, title = "not_found", "Not found"


class ModelNotFound(NotFound):
    code, title = "model_not_found", "Model not found"


class VersionNotFound(NotFound):
    code, title = "version_not_found", "Model version not found"


class LabelNotFound(NotFound):
    code, title = "label_not_found", "Version label not found"


class MethodNotAllowed(ServingError):
    code, title = "method_not_allowed", "Method not allowed"


class Conflict(ServingError):
    code, title = "conflict", "Conflict"


class Gone(ServingError):
    code, title = "gone", "Gone"


class PayloadTooLarge(ServingError):
    code, title = "payload_too_large", "Payload too large"


class TooManyImages(PayloadTooLarge):
    code, title = "too_many_images", "Too many images"


class TooManyPixels(PayloadTooLarge):
    """The images of one request add up to more decoded pixels than the request budget."""

    code, title = "too_many_pixels", "Too many pixels in one request"


class TooManyParts(PayloadTooLarge):
    """A multipart body with more parts than the gateway parses (Werkzeug's ``max_form_parts``)."""

    code, title = "too_many_parts", "Too many multipart parts"


class UnsupportedMediaType(ServingError):
    code, title = "unsupported_media_type", "Unsupported media type"


class Unprocessable(ServingError):
    code, title = "unprocessable", "Unprocessable content"


class Overloaded(ServingError):
    """The batching queue is full: the request was shed before any work was done."""

    code, title = "overloaded", "Too many requests"


class BackendError(ServingError):
    """The model backend answered with an error the gateway cannot blame on the client."""

    code, title = "backend_error", "Backend error"


class BackendUnavailable(BackendError):
    """The model backend could not be reached."""

    code, title = "backend_unavailable", "Backend unavailable"


class ServiceUnavailable(ServingError):
    """Not ready (no model loaded, backend down at start-up) or shedding load."""

    code, title = "unavailable", "Service unavailable"


class DecodeCapacityExceeded(ServiceUnavailable):
    """The worker is already decoding as many pixels as it may hold; the image waits for none."""

    code, title = "decode_capacity_exceeded", "Worker decoding capacity exceeded"


class QueueTimeout(ServiceUnavailable):
    """The request's deadline passed while it waited for a batch slot."""

    code, title = "queue_timeout", "Deadline passed in the queue"


class PreprocessTimeout(ServiceUnavailable):
    """The request's deadline passed while its images were being decoded."""

    code, title = "preprocess_timeout", "Deadline passed while decoding"


class BackendTimeout(ServingError):
    code, title = "backend_timeout", "Backend deadline exceeded"
