"""Prometheus metrics of the gateway (``imgserve_*``), correct under several worker processes.

Names and labels (alert rules and dashboards are written against them):

- ``imgserve_requests_total{endpoint,model,code}``: finished requests; ``code`` is the
  HTTP status (the gRPC server reports the HTTP status its error maps to).
- ``imgserve_request_duration_seconds{endpoint,model}``: end-to-end latency histogram.
- ``imgserve_stage_duration_seconds{stage,model}``: per-request time in ``decode``,
  ``preprocess``, ``queue``, ``predict`` and ``postprocess``.
- ``imgserve_batch_size{model}``: images per forward pass (histogram).
- ``imgserve_inflight_requests``: requests being handled now (gauge, summed over workers).
- ``imgserve_images_total{model}``: images that went through a forward pass.
- ``imgserve_model_version_info{model,version,label}``: 1 per version in service, one series
  per version label (``label=""`` for an unlabelled version).
- ``imgserve_queue_depth{model}``: images waiting for a batch (gauge, summed over workers).

Multiprocess mode: gunicorn and the gRPC supervisor set ``PROMETHEUS_MULTIPROC_DIR``
before starting workers (``serving/metrics_dir.py``); each worker writes its samples to
files there and ``/metrics`` merges them with ``MultiProcessCollector``. ``imgserve_model_version_info``
is not a stored sample but is computed at scrape time from the scraping worker's
view of what is in service, so a retired version disappears at once.

Metrics endpoints, probes and the OpenAPI document are not counted as requests;
``model`` is a known model name or ``""`` (client-supplied names never become
label values, which keeps cardinality bounded).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

STAGES = ("decode", "preprocess", "queue", "predict", "postprocess")
#: Around the latency the gateway promises: single-digit ms at low load, seconds at worst.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

#: ``() -> [(model, version, [labels])]`` for the versions in service.
VersionsInService = Callable[[], Iterable[tuple[str, int, list[str]]]]


def multiprocess_dir() -> str | None:
    """The multiprocess directory when running under several processes, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _VersionInfoCollector(Collector):
    def __init__(self, versions: VersionsInService) -> None:
        self._versions = versions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "imgserve_model_version_info",
            "Model versions in service (1 per version and version label).",
            labels=["model", "version", "label"],
        )
        for model, version, labels in self._versions():
            for label in labels or [""]:
                family.add_metric([model, str(version), label], 1.0)
        yield family


class GatewayMetrics:
    """The gateway's metric objects on their own registry (one per app or server)."""

    def __init__(self, versions: VersionsInService | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._versions = versions or (lambda: [])
        r = self.registry
        self.requests = Counter(
            "imgserve_requests",
            "Finished requests by endpoint, model and HTTP status code.",
            ["endpoint", "model", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "imgserve_request_duration_seconds",
            "End-to-end request latency.",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "imgserve_stage_duration_seconds",
            "Per-request time in each processing stage.",
            ["stage", "model"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "imgserve_batch_size",
            "Images per forward pass.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "imgserve_inflight_requests",
            "Requests being handled now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.images = Counter(
            "imgserve_images",
            "Images that went through a forward pass.",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "imgserve_queue_depth",
            "Images waiting for a batch.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ready_processes = Gauge(
            "imgserve_ready_processes",
            "Serving processes (gunicorn or gRPC workers) whose readiness check passes.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.configured_processes = Gauge(
            "imgserve_configured_processes",
            "Serving processes the server is configured to run.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._scrape_collectors: list[Collector] = [_VersionInfoCollector(lambda: self._versions())]
        if multiprocess_dir() is None:
            r.register(self._scrape_collectors[0])

    def add_scrape_collector(self, collector: Collector) -> None:
        """A collector computed at scrape time (not stored per process): drift, jobs."""
        self._scrape_collectors.append(collector)
        if multiprocess_dir() is None:
            self.registry.register(collector)

    def set_versions_source(self, versions: VersionsInService) -> None:
        """Where ``imgserve_model_version_info`` comes from (the service, once built)."""
        self._versions = versions

    def scrape_registry(self) -> CollectorRegistry:
        """The registry a scrape reads: this process's, or every worker's in multiprocess mode."""
        path = multiprocess_dir()
        if path is None:
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        for collector in self._scrape_collectors:
            registry.register(collector)
        return registry

    def render(self) -> tuple[bytes, str]:
        """The exposition text of a scrape and its content type."""
        return generate_latest(self.scrape_registry()), CONTENT_TYPE_LATEST

    @contextlib.contextmanager
    def track(self, endpoint: str) -> Iterator[dict[str, Any]]:
        """Count one request: in-flight while inside, then code and latency.

        The body sets ``outcome["model"]`` and ``outcome["code"]`` (default 500,
        so an escaped bug is still counted as one).
        """
        outcome: dict[str, Any] = {"model": "", "code": 500}
        self.inflight.inc()
        start = time.perf_counter()
        try:
            yield outcome
        finally:
            elapsed = time.perf_counter() - start
            self.inflight.dec()
            model = outcome["model"]
            self.requests.labels(endpoint, model, str(outcome["code"])).inc()
            self.request_duration.labels(endpoint, model).observe(elapsed)

    def set_configured_processes(self, count: int) -> None:
        """How many serving processes share this metrics directory when all run (1 without one)."""
        self.configured_processes.set(count if multiprocess_dir() is not None else 1)

    def observe_stage(self, stage: str, model: str, seconds: float) -> None:
        self.stage_duration.labels(stage, model).observe(max(0.0, seconds))
