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

from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from calibration.jobs import UnknownJob
from serving.api.rest.admin import require_admin
from serving.api.rest.inference import service
from serving.api.rest.payload import number, parse_json, read_body
from serving.errors import BadRequest, NotFound
from serving.service.feedback import SAFE_NAME, feedback_store, give_feedback
from serving.service.feedback import served_model as service_served_model

bp = Blueprint("calibration", __name__)


def served_model(name: Any) -> str:
    """``name`` when it is a model the gateway serves (400 not a name, 404 unknown)."""
    return service_served_model(service(), name)


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
    feedback_store(svc)  # a disabled store is the answer, whatever the body
    body = _json_body()
    # Capture-store errors (unknown, expired, conflicting, invalid) leave as they are:
    # the error table gives each its status.
    result = give_feedback(
        svc,
        body.get("request_id"),
        labels=body.get("labels"),
        objects=body.get("objects"),
        model=body.get("model"),
    )
    g.metric_model = svc.known_model(result.model)
    payload: dict[str, Any] = {"request_id": result.request_id, "model": result.model}
    if result.objects is not None:
        payload["objects"] = [[_public(o) for o in objs] for objs in result.objects]
    else:
        payload["labels"] = list(result.labels)
    payload["created"] = result.created
    return jsonify(payload), 201 if result.created else 200


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {"label": obj["label"], "box": obj["box"], "input_box": obj["input_box"]}


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
