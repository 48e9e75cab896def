"""``GET /``: a page to try the models from a browser, and its script and style sheet.

The page is static (``static/``): its script asks ``GET /v1/models`` what to offer and
posts the chosen photo to ``/v1/classify`` or ``/v1/detect`` like any other client.
It loads nothing from elsewhere (gateways often run without internet access), and its
Content-Security-Policy holds the browser to that.
"""

from __future__ import annotations

from flask import Blueprint, Response

#: Same-origin only: the page's own script and style sheet, and calls to this gateway.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

bp = Blueprint("try_it", __name__, static_folder="static", static_url_path="/try-it")


@bp.get("/")
def index() -> Response:
    """The try-it page."""
    response = bp.send_static_file("index.html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response
