"""Typed gateway settings, read from ``IMGSERVE_*`` environment variables.

Every field has a docstring (the attribute docstring under it) and one
environment variable: the field name upper-cased with the ``IMGSERVE_`` prefix,
e.g. ``max_batch_size`` is ``IMGSERVE_MAX_BATCH_SIZE``. Values are validated
when the settings are built, so a typo fails at start-up, not at the first
request. This module imports nothing heavy: ``gunicorn.conf.py`` reads it in
the master process before any worker imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from contract.logs import LEVELS as LOG_LEVELS

ENV_PREFIX = "IMGSERVE_"
BACKENDS = ("embedded", "tfserving-grpc", "tfserving-rest")


class SettingsError(ValueError):
    """A setting has a value the gateway cannot run with."""


@dataclass(frozen=True)
class Settings:
    """Gateway configuration. Build with :meth:`from_env`; override in tests with ``replace``."""

    model_base: str = "./models"
    """Model repository root: ``models.config`` and ``<name>/<version>/`` dirs with model cards."""

    backend: str = "embedded"
    """Where forward passes run: ``embedded`` (in-process SavedModel), ``tfserving-grpc``, ``tfserving-rest``."""

    tfserving_grpc: str = "localhost:8500"
    """TF Serving gRPC address (host:port) for the ``tfserving-grpc`` backend."""

    tfserving_rest: str = "http://localhost:8501"
    """TF Serving REST base URL for the ``tfserving-rest`` backend."""

    bind: str = "127.0.0.1:8080"
    """HTTP listen address (host:port) of the gunicorn-served REST API."""

    grpc_bind: str = "127.0.0.1:9000"
    """Listen address (host:port) of ``python -m serving.api.grpc``."""

    grpc_metrics_bind: str = "127.0.0.1:9001"
    """Where the gRPC server process exposes its own ``/metrics`` (empty: not exposed)."""

    grpc_max_workers: int = 128
    """Threads (and most concurrent calls) of each gRPC server process; above it, RESOURCE_EXHAUSTED."""

    grpc_workers: int = 0
    """gRPC server processes sharing ``grpc_bind`` (SO_REUSEPORT), under a supervisor when more
    than 1; 0: as many as the HTTP gateway runs (:meth:`worker_count`), each with the same
    TensorFlow pool sizing. 1: one process, no supervisor."""

    grpc_worker_timeout_s: float = 30.0
    """Under a supervisor: a worker whose health check has gone unanswered this long (and
    that finished no call meanwhile) is hung, and is killed and replaced, as gunicorn's
    ``timeout`` does for its workers."""

    grpc_stop_timeout_s: float = 30.0
    """Under a supervisor: how long SIGTERM waits for the workers to stop (each has 10 s of
    grace for calls in flight) before killing them, like gunicorn's ``graceful_timeout``.
    Keep it under the pod's ``terminationGracePeriodSeconds``."""

    log_level: str = "info"
    """Lowest level logged (``debug``, ``info``, ``warning``, ``error``, ``critical``), by the
    gunicorn master and workers and by the gRPC server processes; every line is JSON."""

    access_log: bool = True
    """One JSON access line per request (REST: method, path, status, duration, bytes, client;
    gRPC: method, code, duration), with its ``request_id``."""

    access_log_probes: bool = False
    """Also log access lines for ``/healthz``, ``/readyz`` and ``/metrics`` (probes and
    scrapes every few seconds would drown the requests)."""

    admin_token: str = ""
    """Bearer token for ``/v1/admin/*`` endpoints; empty disables them (404)."""

    workers: int = 0
    """gunicorn worker processes; 0 chooses: 1 per core for ``embedded`` (each a model copy
    with a one-thread TensorFlow pool), else 2 per core."""

    threads: int = 128
    """Threads per gunicorn worker. They mostly wait on the batcher; more than a running batch
    plus the queue bound, so overload reaches the batcher and is shed (429) instead of
    waiting unbounded in gunicorn's connection queue."""

    tf_intra_op_threads: int = 0
    """TensorFlow intra-op threads per process (embedded backend); 0: cores / workers - 1."""

    tf_inter_op_threads: int = 0
    """TensorFlow inter-op threads per process (embedded backend); 0: TensorFlow's default."""

    max_body_bytes: int = 20 * 1024 * 1024
    """Largest request body accepted (413 above)."""

    max_images_per_request: int = 32
    """Most images in one request (413 above)."""

    max_image_pixels: int = 40_000_000
    """Largest decoded image, width x height, checked from the header before decoding (413 above)."""

    max_request_pixels: int = 64_000_000
    """Decoded-pixel budget of one request: width x height summed over its images, read from
    the headers before any decode (413 above). 64 M lets five 12-MP phone photos
    (4032x3024) or 32 images of 1400x1400 through (32 model-size ones are 1.6 M); decode
    time and memory grow with pixels, not encoded bytes, so this bounds one request's work."""

    max_worker_pixels: int = 48_000_000
    """Decoded pixels one worker process may hold at once, over all the requests it is
    decoding (each image reserves the pixels its decode holds, from just before its decode
    until it is preprocessed: its header's width x height, or for a photo-sized JPEG decode
    the drafted size); an image that would pass it is 503 with Retry-After, not a wait. At
    least ``max_image_pixels``. 48 M is one image at the per-image limit, three 12-MP PNGs,
    or hundreds of 12-MP JPEGs decoded photo-sized at a time; a decode holds about 4 bytes a pixel (Pillow's RGB), so it
    bounds a worker's decode memory near 200 MB whatever the flood."""

    multi_frame: str = "first"
    """Animated / multi-page images: ``first`` uses the first frame (as training does), ``reject`` is 422."""

    max_batch_size: int = 32
    """Dynamic batching: most images in one forward pass (TF Serving ``max_batch_size``)."""

    batch_timeout_micros: int = 2000
    """Dynamic batching: longest wait for a fuller batch after the first image arrives."""

    max_enqueued_batches: int = 2
    """Dynamic batching: queue bound, in batches; beyond ``max_batch_size * this`` images, 429."""

    num_batch_threads: int = 0
    """Concurrent forward passes per model version; 0: 1 for ``embedded``, 4 for TF Serving."""

    request_timeout_s: float = 10.0
    """Default and largest per-request deadline; clients may ask for less (``X-Request-Timeout``)."""

    retry_after_s: int = 1
    """``Retry-After`` seconds sent with 429 and 503."""

    poll_interval_s: float = 2.0
    """How often the repository (new versions, ``models.config`` labels) is re-read."""

    default_label: str = "stable"
    """Version label used when a request names no version; without it, the newest version."""

    default_classifier: str = ""
    """Model for ``/v1/classify`` without ``model``; empty: the only classification model."""

    default_detector: str = ""
    """Model for ``/v1/detect`` without ``model``; empty: the only detection model."""

    detection_score_threshold: float = 0.3
    """Default ``score_threshold`` for detections (classification's default is 0)."""

    warmup_records: int = 4
    """Warm-up requests replayed from ``tf_serving_warmup_requests`` before a version serves."""

    state_dir: str = ""
    """Directory the workers share for drift windows and calibration jobs; empty: under
    ``PROMETHEUS_MULTIPROC_DIR`` (gunicorn, several gRPC workers) or the temp directory."""

    drift_window: int = 256
    """Images in the count-based drift window (per worker; pooled over workers at scrape)."""

    drift_half_life_s: float = 300.0
    """Half-life of the time-decayed drift window, in seconds."""

    capture_dir: str = ""
    """Capture store root for calibration samples (``<dir>/<model>/``); empty: no capture,
    and ``POST /v1/feedback`` answers 404."""

    capture_rate: float = 0.0
    """Fraction of requests captured (0 switches capture off)."""

    capture_max_bytes: int = 1 << 30
    """Size cap of the capture store per model; the oldest samples are dropped first."""

    auto_calibrate_after_s: float = 0.0
    """Start a calibration job when a classifier's served version has drifted above its
    alarm threshold this long without a break (needs capture); 0 switches it off."""

    auto_calibrate_cooldown_s: float = 3600.0
    """No automatic calibration of a model within this long of its last job's start."""

    auto_calibrate_check_s: float = 30.0
    """How often each worker checks the pooled drift scores for automatic calibration."""

    auto_calibrate_promote: str = ""
    """Label an automatic calibration moves (``canary`` or ``stable``); empty: the
    calibrator's default."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``IMGSERVE_*`` variables (``os.environ`` by default), then ``overrides``."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in environ:
                values[f.name] = _coerce(key, environ[key], hints[f.name])
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> Settings:
        """Settings from the environment with ``config`` (field names, any case) on top."""
        fields = {f.name for f in dataclasses.fields(cls)}
        overrides = {}
        for key, value in config.items():
            name = key.lower().removeprefix(ENV_PREFIX.lower())
            if name not in fields:
                raise SettingsError(f"unknown setting {key!r}")
            overrides[name] = value
        return cls.from_env(**overrides)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise SettingsError(f"IMGSERVE_BACKEND must be one of {BACKENDS}, got {self.backend!r}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise SettingsError(
                f"IMGSERVE_LOG_LEVEL must be one of {LOG_LEVELS}, got {self.log_level!r}"
            )
        if self.multi_frame not in ("first", "reject"):
            raise SettingsError("IMGSERVE_MULTI_FRAME must be 'first' or 'reject'")
        positive = (
            "max_body_bytes",
            "max_images_per_request",
            "max_image_pixels",
            "max_request_pixels",
            "max_worker_pixels",
            "max_batch_size",
            "max_enqueued_batches",
            "threads",
            "grpc_max_workers",
            "drift_window",
            "capture_max_bytes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be >= 1")
        non_negative = (
            "workers",
            "grpc_workers",
            "tf_intra_op_threads",
            "tf_inter_op_threads",
            "batch_timeout_micros",
            "num_batch_threads",
            "warmup_records",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be >= 0")
        if self.max_worker_pixels < self.max_image_pixels:
            # Else an image the per-image limit accepts could never be decoded.
            raise SettingsError("IMGSERVE_MAX_WORKER_PIXELS must be >= IMGSERVE_MAX_IMAGE_PIXELS")
        if self.grpc_worker_timeout_s <= 0 or self.grpc_stop_timeout_s <= 0:
            raise SettingsError(
                "IMGSERVE_GRPC_WORKER_TIMEOUT_S and IMGSERVE_GRPC_STOP_TIMEOUT_S must be > 0"
            )
        if self.request_timeout_s <= 0 or self.poll_interval_s <= 0:
            raise SettingsError(
                "IMGSERVE_REQUEST_TIMEOUT_S and IMGSERVE_POLL_INTERVAL_S must be > 0"
            )
        if not 0.0 <= self.capture_rate <= 1.0:
            raise SettingsError("IMGSERVE_CAPTURE_RATE must be in [0, 1]")
        if self.auto_calibrate_after_s < 0 or self.auto_calibrate_cooldown_s < 0:
            raise SettingsError(
                "IMGSERVE_AUTO_CALIBRATE_AFTER_S and IMGSERVE_AUTO_CALIBRATE_COOLDOWN_S must be >= 0"
            )
        if self.auto_calibrate_check_s <= 0:
            raise SettingsError("IMGSERVE_AUTO_CALIBRATE_CHECK_S must be > 0")
        if self.auto_calibrate_promote not in ("", "canary", "stable"):
            raise SettingsError("IMGSERVE_AUTO_CALIBRATE_PROMOTE must be 'canary' or 'stable'")
        if self.auto_calibrate_after_s > 0 and not self.capture_dir:
            raise SettingsError(
                "IMGSERVE_AUTO_CALIBRATE_AFTER_S needs IMGSERVE_CAPTURE_DIR (samples to calibrate on)"
            )
        if self.drift_half_life_s <= 0:
            raise SettingsError("IMGSERVE_DRIFT_HALF_LIFE_S must be > 0")
        if not 0.0 <= self.detection_score_threshold <= 1.0:
            raise SettingsError("IMGSERVE_DETECTION_SCORE_THRESHOLD must be in [0, 1]")
        for name in ("bind", "grpc_bind", "tfserving_grpc"):
            split_host_port(getattr(self, name), name)
        if self.grpc_metrics_bind:
            split_host_port(self.grpc_metrics_bind, "grpc_metrics_bind")

    # -- derived values ---------------------------------------------------------
    @property
    def queue_capacity(self) -> int:
        """Images that may wait per model version before requests are shed."""
        return self.max_batch_size * self.max_enqueued_batches

    @property
    def batch_threads(self) -> int:
        """Concurrent forward passes per model version."""
        if self.num_batch_threads:
            return self.num_batch_threads
        return 1 if self.backend == "embedded" else 4

    def worker_count(self, cpus: int | None = None) -> int:
        """gunicorn workers: one per core for ``embedded``, two per core for remote backends.

        ``embedded``: one process per core, each with its own model copy and a
        one-thread TensorFlow pool, so request handling (one GIL per process) and
        forward passes spread over every core. On 2 cores this served 1.8x the
        images/s of one worker with the same pool total (``make bench``,
        ``--workers``); a model too big to copy per core wants ``IMGSERVE_WORKERS``.
        """
        if self.workers:
            return self.workers
        cpus = cpus or os.cpu_count() or 1
        return cpus if self.backend == "embedded" else 2 * cpus

    def grpc_worker_count(self, cpus: int | None = None) -> int:
        """gRPC server processes: ``grpc_workers``, else the HTTP gateway's :meth:`worker_count`.

        The same sizing, for the same reason: one process has one GIL for every call's
        decoding, preprocessing and metrics, which held the single-process gRPC server to
        43 % of the raw model throughput on 2 cores (HTTP with 2 workers: 64 %).
        """
        return self.grpc_workers or self.worker_count(cpus)

    def grpc_process_settings(self, cpus: int | None = None) -> Settings:
        """The settings of one gRPC server process: ``workers`` is the gRPC process count,
        so :meth:`intra_op_threads` gives each process its share of the cores."""
        return dataclasses.replace(self, workers=self.grpc_worker_count(cpus))

    def intra_op_threads(self, cpus: int | None = None) -> int:
        """TensorFlow intra-op threads: the worker's share of the cores, less one.

        The request threads (decoding, HTTP, the GIL) need a core of their own;
        and for MobileNet-sized models a small pool is faster per image anyway
        (on 2 cores, one oneDNN thread ran batches of 32 faster than two).
        """
        if self.tf_intra_op_threads:
            return self.tf_intra_op_threads
        cpus = cpus or os.cpu_count() or 1
        return max(1, cpus // self.worker_count(cpus) - 1)


def split_host_port(address: str, name: str = "address") -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; raises :class:`SettingsError` when malformed."""
    host, sep, port = address.rpartition(":")
    if (
        not sep
        or not host
        or not (port.isascii() and port.isdigit())
        or not 0 <= int(port) <= 65535
    ):
        raise SettingsError(f"{name} must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _coerce(key: str, raw: str, typ: Any) -> Any:
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{key}={raw!r} is not a valid {typ.__name__}") from exc
