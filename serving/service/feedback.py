"""Feedback on captured requests, for any transport: ``POST /v1/feedback`` and gRPC ``Feedback``.

:func:`give_feedback` checks what the protocol layers parsed (a request id, exactly
one of image labels or per-image objects, an optional model name that must be
served) and records it in the capture store (:mod:`calibration.feedback`), with the
class labels of the version that answered. Errors are the gateway's and the capture
store's own; the error table gives each its HTTP status and gRPC code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from calibration.feedback import (
    FeedbackResult,
    find_capture,
    record_box_feedback,
    record_feedback,
)
from serving.errors import BadRequest, InvalidParameter, ModelNotFound, NotFound
from serving.service.inference import InferenceService

#: What a model name may look like: one path component, never ``.``/``..``, no
#: separators, no NUL. Checked before any path is built from the name.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def served_model(svc: InferenceService, name: Any) -> str:
    """``name`` when it is a model the gateway serves; 400 if it is not a name, 404 if unknown.

    Both checks come before the repository or the capture store is touched, so a
    client cannot probe the file system with path-like names ("/proc", "../x").
    """
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' (string) is required")
    if not SAFE_NAME.fullmatch(name):
        raise InvalidParameter(f"{name!r} is not a model name (letters, digits, '._-')")
    if not svc.known_model(name):
        raise ModelNotFound(f"model {name!r} is not served")
    return name


def feedback_store(svc: InferenceService) -> str:
    """The capture store feedback goes to; 404 when the gateway keeps none."""
    if not svc.settings.capture_dir:
        raise NotFound("feedback is disabled: no capture store (IMGSERVE_CAPTURE_DIR)")
    return svc.settings.capture_dir


def give_feedback(
    svc: InferenceService,
    request_id: Any,
    *,
    labels: Any = None,
    objects: Any = None,
    model: Any = None,
) -> FeedbackResult:
    """Record ``labels`` (one class name or index per image) or ``objects`` (per image,
    ``{"label", "box": [ymin, xmin, ymax, xmax]}`` in original pixels, for a detect
    request) for the captured request ``request_id``.

    ``model`` (None: any) must be a served model's name. The result's ``created`` is
    False for the same feedback again. Raises the gateway's errors for a disabled
    store, a missing id, neither or both kinds of truth and a bad model name; the
    capture store's for an unknown, expired or conflicting request or bad feedback.
    """
    store = feedback_store(svc)
    if not isinstance(request_id, str) or not request_id:
        raise BadRequest("'request_id' (string) is required")
    if labels is not None and objects is not None:
        raise BadRequest("give either 'labels' (image labels) or 'objects' (boxes), not both")
    if labels is None and objects is None:
        raise BadRequest(
            "'labels' (one class name or index per image) or 'objects' (boxes of a "
            "detect request, one list per image) is required"
        )
    if model is not None:
        served_model(svc, model)
    # Unknown id: the store's 404, before any label lookup. Labels are checked against
    # the version that answered the request, whether or not the model was named.
    found, entry = find_capture(store, request_id, model)
    allowed = captured_labels(svc, found, entry.get("version"))
    if objects is not None:
        return record_box_feedback(store, request_id, objects, model=found, allowed=allowed)
    return record_feedback(store, request_id, labels, model=found, allowed=allowed)


def captured_labels(svc: InferenceService, model: str, version: Any) -> Sequence[str] | None:
    """The class labels of the version that served a request (else the newest version's);
    None when the model has left the repository (class names are then taken unchecked)."""
    if not svc.known_model(model):
        return None
    versions = svc.catalog.repository.versions(model)
    if not versions:
        return None
    v = version if isinstance(version, int) and version in versions else versions[-1]
    return list(svc.catalog.version(model, v).class_labels)
