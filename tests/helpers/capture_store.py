"""Helpers shared by the capture-store and feedback tests."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from calibration.capture_store import UnknownRequestError
from calibration.feedback import find_capture
from tests.helpers.servers import wait_for

MODEL = "tiny_classifier"


def image_batch(n: int = 1, value: float = 0.0, size: int = 8) -> np.ndarray:
    """``n`` constant model inputs of ``size`` x ``size`` x 3."""
    return np.full((n, size, size, 3), value, np.float32)


def join_or_fail(proc: mp.Process, timeout: float = 60.0) -> None:
    """Wait for ``proc``; kill it and fail the test if it does not finish in time."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        pytest.fail(f"process {proc.pid} did not finish in {timeout} s")


def wait_captured(capture: str | os.PathLike[str], request_id: str, timeout: float = 60.0) -> None:
    """Wait (bounded) until the gateway's capture thread has written ``request_id``'s shard."""

    def written() -> bool:
        try:
            find_capture(capture, request_id)
        except UnknownRequestError:
            return False
        return True

    assert wait_for(written, timeout=timeout), f"request {request_id} was not captured"
