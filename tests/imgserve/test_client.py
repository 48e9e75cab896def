"""Whose fault a failed call is, and what a call asks for. (Calls against the real
servers, and each failure's exit code end to end: ``test_predict.py``.)"""

from __future__ import annotations

import pytest

from imgserve.client import (
    EXIT_REFUSED,
    EXIT_SERVER_FAILED,
    Options,
    RequestRefused,
    ServerFailed,
    error_for_status,
)


@pytest.mark.parametrize("status", [400, 404, 413, 415, 422])
def test_a_4xx_is_the_clients_fault(status):
    error = error_for_status(status, "why", image_index=1)
    assert isinstance(error, RequestRefused)
    assert (error.exit_code, error.image_index, str(error)) == (EXIT_REFUSED, 1, "why")


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_overload_and_5xx_are_the_servers(status):
    error = error_for_status(status, "why")
    assert isinstance(error, ServerFailed)
    assert error.exit_code == EXIT_SERVER_FAILED


def test_options_left_unset_are_not_sent():
    assert Options().fields() == {}
    assert Options(model="m", label="canary", top_k=3).fields() == {
        "model": "m",
        "label": "canary",
        "top_k": 3,
    }
