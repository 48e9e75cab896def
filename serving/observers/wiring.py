"""Attach drift monitoring, the prediction mix, traffic capture and calibration jobs.

Everything here hangs off the service layer's observer hook or the scrape, so
the request path pays only for folding a few vectors into a window (and, for
the sampled requests, a hand-off to the capture thread).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.capture_store import SampleStore
from calibration.jobs import CalibrationCollector, CalibrationJobs
from serving.metrics import multiprocess_dir
from serving.observers.auto_trigger import DriftTrigger
from serving.observers.capture import CaptureObserver
from serving.observers.drift import DriftCollector, DriftMonitor
from serving.observers.prediction_mix import PredictionMix
from serving.observers.temperature import TemperatureCollector, model_card


@dataclass
class Monitoring:
    """What :func:`attach` set up, for the routes and tests."""

    drift: DriftMonitor
    capture: CaptureObserver | None
    jobs: CalibrationJobs
    state_dir: Path
    trigger: DriftTrigger | None = None


def state_directory(settings: Any) -> Path:
    """Directory shared by the workers: drift windows and calibration jobs."""
    if settings.state_dir:
        path = Path(settings.state_dir)
    elif multiprocess_dir():
        path = Path(multiprocess_dir()) / "imgserve-state"
    else:
        path = Path(tempfile.gettempdir()) / f"imgserve-state-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def attach(service: Any, settings: Any) -> Monitoring:
    """Register the observers and scrape-time collectors on ``service`` (once per service)."""
    existing = getattr(service, "monitoring", None)
    if existing is not None:
        return existing
    metrics = service.metrics
    state = state_directory(settings)
    monitor = DriftMonitor(
        state_dir=state / "drift",
        window=settings.drift_window,
        half_life_s=settings.drift_half_life_s,
        card_lookup=lambda m, v: model_card(service, m, v),
    )
    metrics.add_scrape_collector(DriftCollector(monitor))
    mix = PredictionMix(metrics.registry)
    service.add_observer(monitor)
    service.add_observer(mix)
    capture = None
    if settings.capture_dir:
        store = SampleStore(
            settings.capture_dir,
            rate=settings.capture_rate,
            max_bytes=settings.capture_max_bytes,
            keep_raw=False,
            enabled=settings.capture_rate > 0,
        )
        capture = CaptureObserver(store, metrics.registry)
        service.add_observer(capture)
    jobs = CalibrationJobs(settings.model_base, settings.capture_dir or state / "samples", state)
    metrics.add_scrape_collector(CalibrationCollector(jobs))
    metrics.add_scrape_collector(TemperatureCollector(service))
    trigger = None
    if settings.auto_calibrate_after_s > 0:
        trigger = DriftTrigger(
            service,
            monitor,
            jobs,
            sustain_s=settings.auto_calibrate_after_s,
            cooldown_s=settings.auto_calibrate_cooldown_s,
            check_interval_s=settings.auto_calibrate_check_s,
            promote=settings.auto_calibrate_promote or None,
        )
        service.add_observer(trigger)
    service.monitoring = Monitoring(monitor, capture, jobs, state, trigger)
    return service.monitoring
