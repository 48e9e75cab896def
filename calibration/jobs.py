"""Calibration jobs started from the gateway, run in a separate process.

The admin endpoint never calibrates inside a request worker: it writes the
run's :class:`~calibration.config.CalibrationConfig` into a job file and starts
``python -m calibration.jobs JOB_FILE``, a detached process that rebuilds the
config, calls :func:`calibration.dispatch.calibrate` and writes the outcome into
the job file (atomic rename). Any worker can report any job's status because
the state lives in files, not in the worker that started it. One job per model
at a time. Jobs record what started them (``trigger``: ``admin`` for the
endpoint, ``drift`` for :mod:`serving.observers.auto_trigger`) and why.

Outcomes come from the run itself: ``published`` or ``rejected`` (the gate
refused the candidate) from the result, ``insufficient_samples`` from
NotEnoughSamplesError, ``failed`` from any other error. ``exit_code`` records
what ``python -m training calibrate`` would have exited with.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from calibration.cli import EXIT_CODES
from calibration.config import CalibrationConfig
from calibration.dispatch import calibrate
from calibration.errors import NotEnoughSamplesError
from calibration.result import FAILED, INSUFFICIENT_SAMPLES
from contract.errors import DomainError


class CalibrationBusy(DomainError, RuntimeError):
    """A calibration of this model is already running."""

    code = "calibration_busy"


class CoolingDown(CalibrationBusy):
    """A calibration of this model started too recently (automatic triggers)."""

    code = "calibration_cooling_down"


class UnknownJob(DomainError, KeyError):
    """No calibration job with that id."""

    code = "unknown_calibration_job"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this worker is not alive: reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


class CalibrationJobs:
    """Start and follow calibration jobs; state in ``state_dir/jobs``."""

    def __init__(
        self,
        model_base: str | os.PathLike[str],
        samples_dir: str | os.PathLike[str],
        state_dir: str | os.PathLike[str],
    ) -> None:
        self.model_base = Path(model_base)
        self.samples_dir = Path(samples_dir)
        self.dir = Path(state_dir) / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        model: str,
        *,
        prior_strength: float | None = None,
        promote: str | None = None,
        min_samples: int | None = None,
        trigger: str = "admin",
        cooldown_s: float = 0.0,
        reason: str = "",
    ) -> dict[str, Any]:
        """Start a job for ``model``; raises CalibrationBusy if one is running, and
        InvalidOptionError (nothing started) for options no calibration can run with.

        ``cooldown_s`` > 0 also refuses (CoolingDown) while the model's last job
        started less than that long ago; the check and the start happen under
        the directory's file lock, so several workers start one job between them.
        """
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._refuse_if_busy(model, cooldown_s)
            job_id = f"{int(time.time())}-{secrets.token_hex(4)}"
            asked = {
                "prior_strength": None if prior_strength is None else float(prior_strength),
                "promote": promote,
                "min_samples": None if min_samples is None else int(min_samples),
            }
            config = CalibrationConfig(
                name=model,
                samples_dir=self.samples_dir,
                model_base=self.model_base,
                **{k: v for k, v in asked.items() if v is not None},
            )
            config.validate()
            job = {
                "id": job_id,
                "model": model,
                "config": config.to_dict(),
                "status": "running",
                "trigger": trigger,
                "reason": reason,
                "started_at": time.time(),
                "finished_at": None,
                "exit_code": None,
            }
            path = self.dir / f"{job_id}.json"
            _write_json(path, job)
            job["pid"] = self._spawn(path)
            _write_json(path, job)
            return job

    def _refuse_if_busy(self, model: str, cooldown_s: float) -> None:
        """CalibrationBusy while a job of ``model`` runs; CoolingDown within the cool-down."""
        mine = [job for job in self.jobs() if job["model"] == model]
        for job in mine:
            if job["status"] == "running":
                raise CalibrationBusy(f"calibration job {job['id']} for {model!r} is running")
        last = max((float(job["started_at"]) for job in mine), default=None)
        if cooldown_s > 0 and last is not None and time.time() - last < cooldown_s:
            raise CoolingDown(
                f"the last calibration of {model!r} started {time.time() - last:.0f} s ago"
                f" (cool-down {cooldown_s:.0f} s)"
            )

    def _spawn(self, job_file: Path) -> int:
        """Start the detached job process for ``job_file``; its output goes to the job's log."""
        with open(job_file.with_suffix(".log"), "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "calibration.jobs", str(job_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives a worker restart; not in the request path
            )
        return proc.pid

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's state and log tail; UnknownJob when there is no such job."""
        path = self.dir / f"{job_id}.json"
        if "/" in job_id or not path.exists():
            raise UnknownJob(job_id)
        return self._refresh(path)

    def _refresh(self, path: Path) -> dict[str, Any]:
        job = json.loads(path.read_text())
        if job["status"] == "running" and job.get("pid") and not _alive(int(job["pid"])):
            # The runner died without recording an outcome (killed, OOM).
            job = json.loads(path.read_text())
            if job["status"] == "running":
                job.update(
                    status="failed",
                    finished_at=time.time(),
                    exit_code=None,
                    error="the calibration process ended without a result",
                )
                _write_json(path, job)
        log = path.with_suffix(".log")
        if log.exists():
            job["log_tail"] = log.read_bytes()[-2000:].decode(errors="replace")
        return job

    def jobs(self) -> list[dict[str, Any]]:
        """Every job in the state directory, oldest id first."""
        out = []
        for path in sorted(self.dir.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(self._refresh(path))
        return out


class CalibrationCollector(Collector):
    """``imgserve_calibration_runs_total{model,outcome}`` from the job files."""

    def __init__(self, jobs: CalibrationJobs) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "imgserve_calibration_runs",
            "Finished calibration jobs by outcome.",
            labels=["model", "outcome"],
        )
        counts: dict[tuple[str, str], int] = {}
        for job in self.jobs.jobs():
            if job["status"] != "running":
                key = (job["model"], job["status"])
                counts[key] = counts.get(key, 0) + 1
        for (model, outcome), n in sorted(counts.items()):
            family.add_metric([model, outcome], float(n))
        yield family


def run_job(job_file: Path) -> str:
    """The job process: run the calibration the job file asks for and record its outcome."""
    job = json.loads(job_file.read_text())
    try:
        result = calibrate(CalibrationConfig.from_dict(job["config"]))
        print(json.dumps(result.to_dict(), indent=1, default=float))  # the job's log
        outcome = result.status
    except NotEnoughSamplesError as exc:
        print(f"not enough samples: {exc}", file=sys.stderr)
        outcome = INSUFFICIENT_SAMPLES
    except Exception as exc:  # noqa: BLE001 - recorded as the job's failure
        # Not only domain errors: whatever ends the run is the job's outcome, with
        # the traceback in the job's log for whoever reads it.
        traceback.print_exc()
        print(f"calibration failed: {exc!r}", file=sys.stderr)
        outcome = FAILED
    job = json.loads(job_file.read_text())
    job.update(status=outcome, exit_code=EXIT_CODES[outcome], finished_at=time.time())
    _write_json(job_file, job)
    return outcome


if __name__ == "__main__":
    sys.exit(EXIT_CODES[run_job(Path(sys.argv[1]))])
