"""Attach drift monitoring, the prediction mix, traffic capture and calibration jobs.

Everything here hangs off the service layer's observer hook or the scrape, so
the request path pays only for folding a few vectors into a window (and, for
the sampled requests, a hand-off to the capture thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from calibration.capture_store import SampleStore
from calibration.jobs import CalibrationCollector, CalibrationJobs
from serving import drift
from serving.auto_calibration import DriftTrigger
from serving.metrics import multiprocess_dir

log = logging.getLogger(__name__)


class TemperatureCollector(Collector):
    """``imgserve_model_temperature{model,version}``: the calibration temperature in service."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self):
        family = GaugeMetricFamily(
            "imgserve_model_temperature",
            "Softmax temperature of each version in service (1 = uncalibrated).",
            labels=["model", "version"],
        )
        for model, version, _ in self.service.versions_in_service():
            card = _card(self.service, model, version)
            if card is not None:
                t = float(card.get("calibration", {}).get("temperature", 1.0))
                family.add_metric([model, str(version)], t)
        yield family


def _card(service: Any, model: str, version: int) -> dict | None:
    try:
        return dict(service.catalog.version(model, version).card)
    except Exception:  # a version that vanished between listing and reading
        return None


class CaptureObserver:
    """Samples requests into the capture store from a background thread.

    The request thread only makes the sampling decision and enqueues; a full
    queue drops the sample (counted) rather than slowing requests down.
    """

    def __init__(self, store: SampleStore, registry: Any, queue_size: int = 64) -> None:
        self.store = store
        self.captured = Counter(
            "imgserve_capture_samples",
            "Requests captured for calibration.",
            ["model"],
            registry=registry,
        )
        self.dropped = Counter(
            "imgserve_capture_dropped",
            "Sampled requests dropped (capture queue full).",
            ["model"],
            registry=registry,
        )
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def on_prediction(self, event: Any) -> None:
        with contextlib.suppress(Exception):
            name = event.model.name
            if not self.store.should_capture(name):
                return
            out = event.outputs
            preds = None
            if "probabilities" in out:
                preds = np.asarray(out["probabilities"]).argmax(-1)
            item = (
                name,
                int(event.model.version),
                event.request_id,
                np.asarray(event.inputs),
                preds,
            )
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.dropped.labels(name).inc()

    def _run(self) -> None:
        while True:
            name, version, request_id, inputs, preds = self._queue.get()
            try:
                self.store.capture(name, version, request_id, inputs, preds, force=True)
                self.captured.labels(name).inc()
            except Exception:
                log.exception("capturing request %s failed", request_id)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued samples are written (tests, shutdown)."""

        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)


@dataclass
class Monitoring:
    """What :func:`attach` set up, for the routes and tests."""

    drift: drift.DriftMonitor
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
    monitor = drift.DriftMonitor(
        state_dir=state / "drift",
        window=settings.drift_window,
        half_life_s=settings.drift_half_life_s,
        card_lookup=lambda m, v: _card(service, m, v),
    )
    metrics.add_scrape_collector(drift.DriftCollector(monitor))
    mix = drift.PredictionMix(metrics.registry)
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
