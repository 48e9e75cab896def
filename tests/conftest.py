"""Shared fixtures: real test images in every mode/format, and tiny trained models.

Images come from scikit-image's bundled photographs, re-encoded with Pillow into
each mode and container the service must accept. Models are trained by the real
training code at a tiny size, once per test session.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from tests.helpers.once import computed_once
from tests.helpers.photos import sample_image_bytes, write_photo_crops


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    return sample_image_bytes()


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory) -> tuple[Path, dict]:
    """The session's one default training: the ``tiny`` preset on :func:`write_photo_crops`
    (100 per class, seed 0), exported as ``tiny_classifier`` version 1 (label stable).

    Returns (model base, the training summary without the Keras model). Tests that
    need a default run of the package's BN policy read this one instead of training
    their own: a MobileNetV2 training costs about a minute here, mostly graph tracing.
    """
    from training.classifier import PRESETS, ClassifierConfig, train_classifier

    def train(directory: Path) -> dict:
        base = directory / "models"
        data = write_photo_crops(directory / "photo_crops", 100)
        cfg = ClassifierConfig(
            **{**PRESETS["tiny"], "data": str(data), "model_base": str(base)},
            name="tiny_classifier",
        )
        summary = train_classifier(cfg)
        return {k: v for k, v in summary.items() if k != "model"}

    directory, summary = computed_once(tmp_path_factory, "tiny_training", train)
    return directory / "models", summary


@pytest.fixture(scope="session")
def model_repo(tiny_training) -> Path:
    """A model base with ``tiny_classifier`` version 1 (label stable), really trained."""
    return tiny_training[0]


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

    from contract.repository import ModelRepository
    from training.cli import main

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
