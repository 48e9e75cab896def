"""Shared trainings of the training tests (each MobileNetV2 run costs about a minute)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract.repository import ModelRepository
from tests.helpers.once import computed_once
from tests.helpers.photos import write_photo_crops
from training.cli import main


@dataclass(frozen=True)
class StaleRun:
    """The seeds' bug through the command line: its exit code, output and repository."""

    base: Path
    rc: int
    stderr: str
    #: The run's summary: the JSON line the command prints last, refused or not.
    summary: dict
    versions: list[int]


@pytest.fixture(scope="session")
def stale_run(tmp_path_factory) -> StaleRun:
    """``python -m training classifier`` with Keras's BN defaults (momentum 0.999, no
    precise BN) on the data, seed and preset of the session's default training."""

    def run(directory: Path) -> dict:
        base = directory / "models"
        crops = write_photo_crops(directory / "crops", 100)
        args = ["classifier", "--data", str(crops), "--model-base", str(base), "--name", "stale"]
        args += ["--preset", "tiny", "--bn-momentum", "keras", "--no-precise-bn"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(args)
        lines = out.getvalue().strip().splitlines()
        summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        return {"rc": rc, "stderr": err.getvalue(), "summary": summary}

    directory, r = computed_once(tmp_path_factory, "stale_run", run)
    base = directory / "models"
    return StaleRun(
        base, r["rc"], r["stderr"], r["summary"], ModelRepository(base).versions("stale")
    )
