"""Traffic capture: sampled requests go to the calibration capture store."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

import numpy as np
from prometheus_client import Counter

from calibration.capture_store import SampleStore
from contract.logs import log_fields

log = logging.getLogger(__name__)


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
            inputs = np.asarray(event.inputs)
            # Geometry is known for decoded images only (not for a tensor request);
            # with it the shard can take box feedback in original pixels.
            geoms = tuple(getattr(event, "geometries", ()) or ())
            geometry = (
                np.stack([g.to_array() for g in geoms]) if len(geoms) == len(inputs) else None
            )
            item = (
                name,
                int(event.model.version),
                event.request_id,
                inputs,
                preds,
                geometry,
                event.task,
            )
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.dropped.labels(name).inc()

    def _run(self) -> None:
        while True:
            name, version, request_id, inputs, preds, geometry, task = self._queue.get()
            try:
                self.store.capture(
                    name,
                    version,
                    request_id,
                    inputs,
                    preds,
                    force=True,
                    geometry=geometry,
                    task=task,
                )
                self.captured.labels(name).inc()
            except Exception:
                with log_fields(request_id=request_id):  # this thread serves no request
                    log.exception("capturing request %s failed", request_id)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued samples are written (tests, shutdown)."""

        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
