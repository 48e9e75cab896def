"""Automatic calibration when drift stays above its alarm threshold.

Off unless ``IMGSERVE_AUTO_CALIBRATE_AFTER_S`` is above zero. Each worker runs
one checking thread (started with its first prediction, like drift folding)
that every ``check_interval_s`` reads the drift scores pooled over all workers
(:meth:`serving.observers.drift.DriftMonitor.scores`) for the version each
classifier and detector serves by default. A version is *in alarm* when its
count window holds at least the images its reference thresholds were computed
for (the model card's drift window: a smaller window is noisier than the
thresholds allow) and some layer's score is above its threshold.

When the alarm has held for ``sustain_s`` without a break, the worker starts a
calibration job (:class:`calibration.jobs.CalibrationJobs`, a separate
process, with ``trigger: "drift"`` in the job record). The jobs directory's file
lock makes the decision once across workers: a job is not started while one
for the model runs or within ``cooldown_s`` of the last one's start, whatever
its outcome, so a rejected candidate is not retried in a loop. A published
version starts with an empty window, so its own drift is judged afresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from calibration.jobs import CalibrationBusy, CalibrationJobs
from contract.model_card import bn_reference_of
from serving.observers.drift import DriftMonitor, WorkerLoop

log = logging.getLogger(__name__)


def exceeded(entry: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(layer, score, value, threshold) of the count-window scores above their thresholds."""
    limits = entry.get("thresholds", {})
    return [
        (layer, name, value, limits[layer][name])
        for layer, scores in sorted(entry.get("count", {}).items())
        for name, value in sorted(scores.items())
        if name in limits.get(layer, {}) and value > limits[layer][name]
    ]


def in_alarm(entry: dict[str, Any], min_images: int) -> bool:
    """Whether one version's score entry (``DriftMonitor.scores``) is above threshold."""
    return entry.get("images", 0) >= min_images and bool(exceeded(entry))


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
        self._loop = WorkerLoop(self.check, self.check_interval_s, "drift-trigger")

    # -- observer: only makes sure this worker's checking thread runs -----------
    def on_prediction(self, event: Any) -> None:
        self._loop.ensure()

    def close(self) -> None:
        self._loop.stop()

    # -- the decision ------------------------------------------------------------
    def _served(self) -> dict[str, int]:
        """Classifiers and detectors, and the version each serves by default."""
        return {
            info["name"]: int(info["default_version"])
            for info in self.service.list_models()
            if info.get("task") in ("classification", "detection") and info.get("default_version")
        }

    def check(self) -> list[dict[str, Any]]:
        """One round: update the alarms and start the jobs that are due; returns them."""
        now = self.clock()
        scores = self.monitor.scores()
        started = []
        for model, version in self._served().items():
            key = (model, version)
            entry = scores.get(key, {})
            card = self.monitor.card(*key)
            drift = bn_reference_of(card).drift if card is not None else None
            window = int(drift.window or 0) if drift is not None else 0
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
    parts = [
        f"{layer} {name} {value:.3g} > {limit:.3g}" for layer, name, value, limit in exceeded(entry)
    ]
    return f"drift over {entry.get('images', 0)} images: " + "; ".join(parts)
