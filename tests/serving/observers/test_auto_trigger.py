"""Automatic calibration: the alarm rule and the cool-down (the end-to-end run is in
``test_wiring.py``)."""

from __future__ import annotations

import json
import time

import pytest

from calibration.jobs import CalibrationBusy, CalibrationJobs, CoolingDown
from serving.observers.auto_trigger import in_alarm

THRESHOLDS = {"block1": {"mean_shift": 1.0, "sym_kl": 0.5}, "block2": {"mean_shift": 2.0}}


def entry(images: int, **scores: dict[str, float]) -> dict:
    return {"images": images, "thresholds": THRESHOLDS, "count": scores}


def test_alarm_needs_a_full_window_and_a_score_above_its_threshold():
    quiet = {"mean_shift": 0.9, "sym_kl": 0.4}
    assert not in_alarm(entry(300, block1=quiet, block2={"mean_shift": 1.9}), 256)
    assert in_alarm(entry(300, block1={"mean_shift": 0.9, "sym_kl": 0.6}), 256)
    assert in_alarm(entry(256, block1=quiet, block2={"mean_shift": 2.1}), 256)
    # Too few images for the thresholds' window: noisier than they allow, no alarm.
    assert not in_alarm(entry(255, block1={"mean_shift": 5.0}), 256)
    assert not in_alarm({"images": 0, "thresholds": THRESHOLDS}, 1)
    # A score the card has no threshold for never alarms.
    assert not in_alarm(entry(300, block2={"sym_kl": 9.0}), 256)


def _record(jobs: CalibrationJobs, model: str, status: str, started_at: float) -> None:
    job = {
        "id": f"{int(started_at)}-test",
        "model": model,
        "status": status,
        "started_at": started_at,
        "finished_at": started_at + 1,
        "exit_code": 3,
    }
    (jobs.dir / f"{job['id']}.json").write_text(json.dumps(job))


def test_cool_down_counts_from_the_last_job_of_that_model(tmp_path):
    jobs = CalibrationJobs(tmp_path / "models", tmp_path / "samples", tmp_path / "state")
    _record(jobs, "a", "rejected", time.time() - 100)
    with pytest.raises(CoolingDown, match="cool-down 3600"):
        jobs.start("a", trigger="drift", cooldown_s=3600)
    assert issubclass(CoolingDown, CalibrationBusy)
    assert len(jobs.jobs()) == 1  # nothing was started


def test_a_running_job_blocks_another_whatever_the_cool_down(tmp_path):
    jobs = CalibrationJobs(tmp_path / "models", tmp_path / "samples", tmp_path / "state")
    _record(jobs, "a", "running", time.time() - 10_000)
    with pytest.raises(CalibrationBusy, match="is running"):
        jobs.start("a", trigger="drift", cooldown_s=60)
