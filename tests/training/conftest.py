"""Shared trainings of the training tests (each MobileNetV2 run costs about a minute)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import write_photo_crops
from training.cli import main
from training.repository import ModelRepository


@dataclass(frozen=True)
class StaleRuns:
    """The seeds' bug through the command line, trained twice on the same data and seed."""

    base: Path
    refused_rc: int
    refused_stderr: str
    versions_after_refusal: list[int]
    forced_rc: int
    #: The forced run's summary (the JSON line the command prints last).
    forced_summary: dict


@pytest.fixture(scope="session")
def stale_runs(tmp_path_factory) -> StaleRuns:
    """``python -m training classifier`` with Keras's BN defaults (momentum 0.999, no
    precise BN) on the data of the session's default training: once as is (the export
    gate must refuse), once with ``--force`` (exported anyway)."""
    base = tmp_path_factory.mktemp("stale_models")
    crops = write_photo_crops(tmp_path_factory.mktemp("stale_crops"), 100)
    args = ["classifier", "--data", str(crops), "--model-base", str(base), "--name", "stale"]
    args += ["--preset", "tiny", "--bn-momentum", "keras", "--no-precise-bn"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        refused_rc = main(args)
    versions = ModelRepository(base).versions("stale")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        forced_rc = main([*args, "--force"])
    lines = out.getvalue().strip().splitlines()
    return StaleRuns(
        base,
        refused_rc,
        err.getvalue(),
        versions,
        forced_rc,
        json.loads(lines[-1]) if lines else {},
    )
