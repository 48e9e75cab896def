"""Request ids: the client's own when it is a safe token, else a fresh one; the access log."""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets

#: One line per request (REST) or call (gRPC), each with its ``request_id``.
ACCESS_LOG = logging.getLogger("serving.access")
# Switched by the ``access_log`` setting, not by ``log_level``: its lines are INFO
# records that must still appear when the level is ``warning``.
ACCESS_LOG.setLevel(logging.INFO)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class _RequestIds:
    """Fresh request ids: 16 random hex digits per process, then a counter.

    Unique across workers and restarts like a UUID4 (64 random bits per process
    start), but a counter step instead of a ``urandom`` call per request.
    """

    def __init__(self) -> None:
        self._pid = 0
        self._prefix = ""
        self._counter = itertools.count()

    def __call__(self) -> str:
        if self._pid != os.getpid():  # first use, or a forked child: a prefix of its own
            self._prefix, self._pid = secrets.token_hex(8), os.getpid()
        return f"{self._prefix}{next(self._counter):016x}"


_new_request_id = _RequestIds()


def request_id_from(candidate: str | None) -> str:
    """The client's request id when it is a safe token, else a fresh one (32 hex digits)."""
    if candidate and _REQUEST_ID.match(candidate):
        return candidate
    return _new_request_id()
