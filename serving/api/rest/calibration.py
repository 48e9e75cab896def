"""Feedback and calibration: ``POST /v1/feedback`` and the calibration admin endpoints.

- ``POST /v1/feedback`` ``{"request_id": ..., "labels": [...], "model": optional}``:
  joins true labels (class names or indices, one per image of the request) to a
  captured request. 201 recorded, 200 the same labels again; 404 unknown id,
  410 expired sample, 409 different labels recorded before, 422 bad labels.
  For a captured detect request, ``"objects"`` instead of ``"labels"``: per image
  a list of ``{"label": name or index, "box": [ymin, xmin, ymax, xmax]}`` in the
  original image's pixels (the detect response's coordinates), checked against
  the image size and the captured version's labels (422 otherwise, and for a
  classify request id); both keys at once is a 400.
- ``POST /v1/admin/calibrations`` ``{"model": ..., "prior_strength": N,
  "promote": "canary"|"stable", "min_samples": N}`` (admin token): starts a
  calibration job in a separate process; 202 with the job, 409 if one runs, 400
  (nothing started) for an option no run can use (a negative or non-finite
  ``prior_strength``, ``min_samples`` < 1 or not an integer).
- ``GET /v1/admin/calibrations[/<id>]`` (admin token): job status and log tail.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from calibration.feedback import find_capture, record_box_feedback, record_feedback
from calibration.jobs import UnknownJob
from serving.api.rest.admin import require_admin
from serving.api.rest.inference import service
from serving.api.rest.payload import number, parse_json, read_body
from serving.errors import BadRequest, InvalidParameter, ModelNotFound, NotFound

bp = Blueprint("calibration", __name__)

#: What a model or job name may look like: one path component, never ``.``/``..``,
#: no separators, no NUL. Checked before any path is built from the name.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def served_model(name: Any) -> str:
    """``name`` when it is a model the gateway serves; 400 if it is not a name, 404 if unknown.

    Both checks come before the repository or the capture store is touched, so a
    client cannot probe the file system with path-like names ("/proc", "../x").
    """
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' (string) is required")
    if not SAFE_NAME.fullmatch(name):
        raise InvalidParameter(f"{name!r} is not a model name (letters, digits, '._-')")
    svc = service()
    if not svc.known_model(name):
        raise ModelNotFound(f"model {name!r} is not served")
    return name


def _json_body() -> dict[str, Any]:
    # Not request.get_json(silent=True): it lets a RecursionError through (a 500).
    body = parse_json(read_body(request)) if request.is_json else None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)")
    return body


def _monitoring():
    return current_app.extensions["imgserve.monitoring"]


@bp.post("/v1/feedback")
def feedback():
    svc = service()
    if not svc.settings.capture_dir:
        raise NotFound("feedback is disabled: no capture store (IMGSERVE_CAPTURE_DIR)")
    body = _json_body()
    request_id, labels, model = body.get("request_id"), body.get("labels"), body.get("model")
    objects = body.get("objects")
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
        g.metric_model = served_model(model)
    if objects is not None:
        return _box_feedback(svc, request_id, objects, model)
    allowed = None
    if model is not None:
        mv = svc.catalog.repository.versions(model)
        if mv:
            allowed = list(svc.catalog.version(model, mv[-1]).class_labels)
    # Capture-store errors (unknown, expired, conflicting, invalid) leave as they are:
    # the error table gives each its status.
    result = record_feedback(
        svc.settings.capture_dir, request_id, labels, model=model, allowed=allowed
    )
    payload = {
        "request_id": result.request_id,
        "model": result.model,
        "labels": list(result.labels),
        "created": result.created,
    }
    return jsonify(payload), 201 if result.created else 200


def _box_feedback(svc: Any, request_id: str, objects: Any, model: str | None):
    """Box feedback: labels checked against the version that served the request."""
    store = svc.settings.capture_dir
    # Unknown id: the store's 404, before any label lookup.
    found, entry = find_capture(store, request_id, model)
    g.metric_model = svc.known_model(found)
    allowed = _captured_labels(svc, found, entry.get("version"))
    result = record_box_feedback(store, request_id, objects, model=found, allowed=allowed)
    payload = {
        "request_id": result.request_id,
        "model": result.model,
        "objects": [[_public(o) for o in objs] for objs in result.objects or ()],
        "created": result.created,
    }
    return jsonify(payload), 201 if result.created else 200


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {"label": obj["label"], "box": obj["box"], "input_box": obj["input_box"]}


def _captured_labels(svc: Any, model: str, version: Any) -> list[str] | None:
    """The class labels of the version that served a request (else the newest version's);
    None when the model has left the repository (class names are then taken unchecked)."""
    if not svc.known_model(model):
        return None
    versions = svc.catalog.repository.versions(model)
    if not versions:
        return None
    v = version if isinstance(version, int) and version in versions else versions[-1]
    return list(svc.catalog.version(model, v).class_labels)


@bp.post("/v1/admin/calibrations")
def start_calibration():
    require_admin()
    body = _json_body()
    svc = service()
    model = g.metric_model = served_model(body.get("model"))
    if not svc.catalog.repository.versions(model):
        raise NotFound(f"no model {model!r} in the repository")
    promote = body.get("promote")
    if promote not in (None, "canary", "stable"):
        raise BadRequest("'promote' must be 'canary' or 'stable'")
    prior = number("prior_strength", body.get("prior_strength"), float)
    min_samples = number("min_samples", body.get("min_samples"), int)
    # CalibrationBusy (one is running) is a 409 by the error table, InvalidOptionError
    # (a negative or non-finite prior, min_samples < 1) a 400: no job is started.
    job = _monitoring().jobs.start(
        model, prior_strength=prior, promote=promote, min_samples=min_samples
    )
    return jsonify(job), 202


@bp.get("/v1/admin/calibrations")
def list_calibrations():
    require_admin()
    return jsonify({"jobs": _monitoring().jobs.jobs()})


@bp.get("/v1/admin/calibrations/<job_id>")
def calibration_status(job_id: str):
    require_admin()
    if not SAFE_NAME.fullmatch(job_id):  # never a path: "..", NUL, separators
        raise NotFound(f"no calibration job {job_id!r}")
    try:
        return jsonify(_monitoring().jobs.get(job_id))
    except UnknownJob as exc:  # a KeyError's text is the bare quoted id: say what is missing
        raise NotFound(f"no calibration job {job_id!r}") from exc
