"""Calibration jobs: the job file carries the config, the child records the run's outcome."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from calibration import jobs
from calibration.config import CalibrationConfig
from calibration.errors import CalibrationError, NotEnoughSamplesError
from calibration.jobs import CalibrationBusy, CalibrationJobs, CoolingDown, UnknownJob, run_job


def _job_file(tmp_path: Path, config: CalibrationConfig) -> Path:
    path = tmp_path / "1-test.json"
    job = {"id": "1-test", "model": config.name, "config": config.to_dict(), "status": "running"}
    path.write_text(json.dumps(job))
    return path


@pytest.mark.parametrize(
    ("outcome", "expected", "exit_code"),
    [
        (SimpleNamespace(status="published", to_dict=dict), "published", 0),
        (SimpleNamespace(status="rejected", to_dict=dict), "rejected", 3),
        (NotEnoughSamplesError("3 usable samples"), "insufficient_samples", 4),
        (CalibrationError("no stable version"), "failed", 5),
        (RuntimeError("out of memory"), "failed", 5),
    ],
)
def test_the_child_records_the_outcome_of_the_config_it_was_given(
    tmp_path, monkeypatch, outcome, expected, exit_code
):
    config = CalibrationConfig(
        name="m", samples_dir=tmp_path / "s", model_base=tmp_path / "models", prior_strength=2.5
    )
    seen = []

    def fake_calibrate(cfg: CalibrationConfig):
        seen.append(cfg)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(jobs, "calibrate", fake_calibrate)
    path = _job_file(tmp_path, config)
    assert run_job(path) == expected
    assert seen == [config]
    job = json.loads(path.read_text())
    assert job["status"] == expected and job["exit_code"] == exit_code
    assert job["finished_at"] is not None


def test_start_records_the_config_with_what_was_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(CalibrationJobs, "_spawn", lambda self, path: 4242)
    runner = CalibrationJobs(tmp_path / "models", tmp_path / "samples", tmp_path / "state")
    job = runner.start("m", prior_strength=3, min_samples=10, trigger="drift", reason="block1")
    config = CalibrationConfig.from_dict(job["config"])
    assert config == CalibrationConfig(
        name="m",
        samples_dir=tmp_path / "samples",
        model_base=tmp_path / "models",
        prior_strength=3.0,
        min_samples=10,
    )
    assert config.promote == "canary"  # not asked: the command line's default
    stored = json.loads((runner.dir / f"{job['id']}.json").read_text())
    assert stored["config"] == job["config"] and stored["pid"] == 4242
    assert stored["trigger"] == "drift" and stored["reason"] == "block1"


def test_job_errors_carry_a_code_and_no_http_status():
    for error in (CalibrationBusy, CoolingDown, UnknownJob):
        assert isinstance(error.code, str) and error.code
        assert not hasattr(error, "status")


@pytest.mark.slow
def test_a_job_for_a_model_without_a_stable_version_fails(tmp_path):
    runner = CalibrationJobs(tmp_path / "models", tmp_path / "samples", tmp_path / "state")
    job = runner.start("missing")
    deadline = time.monotonic() + 300
    while runner.get(job["id"])["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    done = runner.get(job["id"])
    assert done["status"] == "failed" and done["exit_code"] == 5, done
    assert "no version labelled 'stable'" in done["log_tail"]
