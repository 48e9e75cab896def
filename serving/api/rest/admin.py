"""Token-protected operations: ``POST /v1/admin/reload`` re-reads the repository now.

Disabled (404) unless ``IMGSERVE_ADMIN_TOKEN`` is set; the token travels as
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, jsonify, request

from serving.api.rest.inference import service
from serving.errors import NotFound, Unauthorized

bp = Blueprint("admin", __name__)


def require_admin() -> None:
    """Raise unless the request carries the configured admin token."""
    token = service().settings.admin_token
    if not token:
        raise NotFound("admin endpoints are disabled (IMGSERVE_ADMIN_TOKEN is not set)")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")


@bp.post("/v1/admin/reload")
def reload():
    require_admin()
    svc = service()
    svc.refresh()
    return jsonify({"models": svc.list_models()})
