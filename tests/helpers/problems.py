"""Assertions on what REST clients get: problem documents, and the tensors the model saw."""

from __future__ import annotations

PROBLEM = "application/problem+json"


class Capture:
    """An observer keeping the preprocessed tensors the gateway fed the model."""

    def __init__(self) -> None:
        self.events = []

    def on_prediction(self, event) -> None:
        self.events.append(event)


def assert_problem(response, status: int, code: str | None = None) -> dict:
    """Assert ``response`` is a problem+json document with ``status`` (and ``code``); return it."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    doc = response.get_json(force=True)
    assert doc["status"] == status and doc["title"] and doc["detail"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert doc["request_id"] == response.headers["X-Request-ID"]
    if code:
        assert doc["code"] == code
    return doc
