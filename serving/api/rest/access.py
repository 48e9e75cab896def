"""A request's id in every line logged while serving it, and one access line per request.

:func:`begin` (``before_request``) binds ``request_id`` to the request's context,
so every log line written while serving it carries the id the client gets back in
``X-Request-ID``; :func:`finish` (``after_request``) writes the access line with the
status the app really sent; :func:`end` (``teardown_request``) unbinds. The access
line comes from the app, not from gunicorn's access log, because only the app knows
the request id.
"""

from __future__ import annotations

import time

from flask import Response, g, request

from contract.logs import bind_log_fields, unbind_log_fields
from serving.service import ACCESS_LOG
from serving.settings import Settings

#: Probes and scrapes: logged only with ``access_log_probes``.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def begin(request_id: str) -> None:
    """Bind ``request_id`` to every line logged while this request is served."""
    g.access_start = time.perf_counter()
    g.log_token = bind_log_fields(request_id=request_id)


def finish(response: Response, settings: Settings) -> None:
    """Write the request's access line (unless switched off, or a probe without probes)."""
    start = g.pop("access_start", None)
    if start is None or not settings.access_log:
        return
    if request.path in PROBE_PATHS and not settings.access_log_probes:
        return
    duration_ms = round((time.perf_counter() - start) * 1000.0, 3)
    ACCESS_LOG.info(
        "%s %s %d",
        request.method,
        request.path,
        response.status_code,
        extra={
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": duration_ms,
            # None for a streamed body, whose length is not known up front.
            "bytes": response.content_length,
            "remote_addr": request.remote_addr,
            "user_agent": request.user_agent.string or None,
        },
    )


def end() -> None:
    """Unbind the request id (the context may serve another request next)."""
    token = g.pop("log_token", None)
    if token is not None:
        unbind_log_fields(token)
