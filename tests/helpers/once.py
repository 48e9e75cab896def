"""Results computed once per test run, shared between pytest-xdist workers."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def computed_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, compute: Callable[[Path], dict]
) -> tuple[Path, dict]:
    """``compute(directory)`` once per test run: a directory of results and a JSON summary.

    Under pytest-xdist (``make test`` runs two workers) every worker process has its own
    session; the first to ask computes under an exclusive lock in the run's shared
    temporary directory, and the others wait for it and read what it wrote. Without
    xdist it is a plain session fixture body. The results are shared: never mutate them.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        directory = tmp_path_factory.mktemp(name)
        return directory, json.loads(_to_json(compute(directory)))
    shared = tmp_path_factory.getbasetemp().parent
    directory, done = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if done.exists():
            return directory, json.loads(done.read_text())
        shutil.rmtree(directory, ignore_errors=True)  # a failed attempt's leftovers
        directory.mkdir()
        text = _to_json(compute(directory))
        done.write_text(text)
        return directory, json.loads(text)


def _to_json(summary: dict) -> str:
    """JSON of a run's summary: numpy scalars as numbers, paths as strings."""
    return json.dumps(summary, default=lambda v: v.item() if hasattr(v, "item") else str(v))
