"""Domain errors: failures named by what went wrong, not by how a transport reports it.

Every error the project's libraries raise for bad input or state subclasses
:class:`DomainError` and names itself with a stable, machine-readable ``code``
and a short human ``title``. Which HTTP status or gRPC code a failure becomes
is the gateway's decision alone (``serving/api/errors.py``), so nothing here
carries a transport status.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class of domain errors: ``code`` (stable machine-readable name) and ``title``."""

    code = "domain_error"
    title = "Domain error"
