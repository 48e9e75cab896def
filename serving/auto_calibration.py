"""Automatic calibration when drift stays above its alarm threshold.

Off unless ``IMGSERVE_AUTO_CALIBRATE_AFTER_S`` is above zero. Each worker runs
one checking thread (started with its first prediction, like drift folding)
that every ``check_interval_s`` reads the drift scores pooled over all workers
(:meth:`serving.drift.DriftMonitor.scores`) for the version each
classification model serves by default. A version is *in alarm* when its
count window holds at least the images its reference thresholds were computed
for (the model card's drift window: a smaller window is noisier than the
thresholds allow) and some layer's score is above its threshold.

When the alarm has held for ``sustain_s`` without a break, the worker starts a
calibration job (:class:`serving.calibration_jobs.CalibrationJobs`, a separate
process, with ``trigger: "drift"`` in the job record). The jobs directory's file
lock makes the decision once across workers: a job is not started while one
for the model runs or within ``cooldown_s`` of the last one's start, whatever
its outcome, so a rejected candidate is not retried in a loop. A published
version starts with an empty window, so its own drift is judged afresh.

Detectors are left alone (the calibrator handles classifiers only).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from serving.calibration_jobs import CalibrationBusy, CalibrationJobs
from serving.drift import DriftMonitor

log = logging.getLogger(__name__)


def in_alarm(entry: dict[str, Any], min_images: int) -> bool:
    """Whether one version's score entry (``DriftMonitor.scores``) is above threshold."""
    if entry.get("images", 0) < min_images or "count" not in entry:
        return False
    limits = entry.get("thresholds", {})
    for layer, scores in entry["count"].items():
        for name, value in scores.items():
            limit = limits.get(layer, {}).get(name)
            if limit is not None and value > limit:
                return True
    return False


class DriftTrigger:
    """Start a calibration job for a model whose served version drifts for ``sustain_s``."""

    def __init__(
        self,
        service: Any,
        monitor: DriftMonitor,
        jobs: CalibrationJobs,
        *,
        sustain_s: float,
        cooldown_s: float,
        check_interval_s: float = 30.0,
        promote: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sustain_s <= 0:
            raise ValueError("sustain_s must be positive")
        self.service = service
        self.monitor = monitor
        self.jobs = jobs
        self.sustain_s = float(sustain_s)
        self.cooldown_s = float(cooldown_s)
        self.check_interval_s = float(check_interval_s)
        self.promote = promote
        self.clock = clock
        self._alarm_since: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    # -- observer: only makes sure this worker's checking thread runs -----------
    def on_prediction(self, event: Any) -> None:
        if self._pid != os.getpid():
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._alarm_since.clear()  # a forked worker starts its own watch
            self._thread = threading.Thread(target=self._loop, name="drift-trigger", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            try:
                self.check()
            except Exception:  # monitoring must never take the worker down
                log.exception("automatic calibration check failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout=5)

    # -- the decision ------------------------------------------------------------
    def _served(self) -> dict[str, int]:
        """Classification models and the version each serves by default."""
        return {
            info["name"]: int(info["default_version"])
            for info in self.service.list_models()
            if info.get("task") == "classification" and info.get("default_version")
        }

    def check(self) -> list[dict[str, Any]]:
        """One round: update the alarms and start the jobs that are due; returns them."""
        now = self.clock()
        scores = self.monitor.scores()
        started = []
        for model, version in self._served().items():
            key = (model, version)
            entry = scores.get(key, {})
            card = self.monitor.card(*key) or {}
            window = int(card.get("bn_reference", {}).get("drift", {}).get("window", 0))
            if not in_alarm(entry, max(window, 1)):
                self._alarm_since.pop(key, None)
                continue
            since = self._alarm_since.setdefault(key, now)
            if now - since < self.sustain_s:
                continue
            try:
                job = self.jobs.start(
                    model,
                    promote=self.promote,
                    trigger="drift",
                    cooldown_s=self.cooldown_s,
                    reason=_reason(entry),
                )
            except CalibrationBusy as exc:
                log.debug("automatic calibration of %s not started: %s", model, exc)
                continue
            log.warning(
                "drift on %s version %d for %.0f s: started calibration job %s",
                *(model, version, now - since, job["id"]),
            )
            self._alarm_since.pop(key, None)
            started.append(job)
        return started


def _reason(entry: dict[str, Any]) -> str:
    """The layers above threshold, for the job record."""
    parts = []
    limits = entry.get("thresholds", {})
    for layer, scores in sorted(entry.get("count", {}).items()):
        for name, value in sorted(scores.items()):
            limit = limits.get(layer, {}).get(name)
            if limit is not None and value > limit:
                parts.append(f"{layer} {name} {value:.3g} > {limit:.3g}")
    return f"drift over {entry.get('images', 0)} images: " + "; ".join(parts)
