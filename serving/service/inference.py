"""The service layer: classify and detect, knowing nothing of HTTP or gRPC.

Both protocol layers (``serving.api.rest`` and ``serving.api.grpc``) turn their
requests into a list of encoded images and :class:`PredictOptions`, call
:meth:`InferenceService.classify`, ``detect`` or ``predict`` (every raw output, for
TF Serving's API), and render the result or the error by :mod:`serving.api.errors`:

1. select the model version (name, version or label; the default label otherwise),
2. read every image's header and refuse the request (413) when their pixels add up to
   more than ``max_request_pixels``, before any decode; then decode and preprocess
   each image with ``contract.preprocessing``, configured by that version's model
   card (``decode`` and ``preprocess`` stages), checking the deadline before each and
   reserving its pixels of the worker's ``max_worker_pixels`` (503 when they do not fit),
3. queue the tensors in the version's :class:`DynamicBatcher` (``queue``, ``predict``),
4. turn the outputs into labels and scores, or boxes in original pixels (``postprocess``),
5. hand the preprocessed inputs and every raw output (including the BN probe
   statistics ``bn_input_mean``/``bn_input_sqmean``) to the registered
   :class:`PredictionObserver` s, so drift monitoring and traffic capture need no
   second forward pass.

A background poller re-reads the repository: new versions are loaded before a
label moves to them, retired versions finish the requests they already hold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.backends.base import AVAILABLE, Backend
from serving.batching import BatcherClosed, BatcherHooks, DynamicBatcher
from serving.catalog import CLASSIFICATION, DETECTION, Catalog, ModelVersion, RepositorySnapshot
from serving.errors import (
    BadRequest,
    InvalidParameter,
    LabelNotFound,
    ModelNotFound,
    ServiceUnavailable,
    TooManyImages,
    VersionNotFound,
)
from serving.metrics import GatewayMetrics
from serving.service.inputs import StageTiming, checked_tensor, preprocess_images
from serving.service.pixel_budget import check_pixel_budget
from serving.service.postprocess import classifications, detections
from serving.service.types import (
    ClassifyResult,
    DetectResult,
    ModelRef,
    PredictionEvent,
    PredictionObserver,
    PredictOptions,
    PredictResult,
    TensorResult,
)
from serving.service.worker_pixels import WorkerPixelLimit
from serving.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _State:
    snapshot: RepositorySnapshot
    available: Mapping[str, Sequence[int]]
    labels: Mapping[str, Mapping[str, int]]  # effective labels: targets that are available
    backend_ok: bool = True
    backend_reason: str = ""

    def labels_of(self, name: str, version: int) -> list[str]:
        return sorted(k for k, v in self.labels.get(name, {}).items() if v == version)


# -- the service -----------------------------------------------------------------------
class InferenceService:
    """Classification and detection over one backend, with dynamic batching per version."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        *,
        catalog: Catalog | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.catalog = catalog or Catalog(settings.model_base)
        self.metrics = metrics or GatewayMetrics()
        self.metrics.set_versions_source(self.versions_in_service)
        # Every process reports one of N: a scrape tells "k of N workers ready".
        self.metrics.set_configured_processes(settings.worker_count())
        self._state = _State(RepositorySnapshot({}), {}, {})
        #: Decoded pixels in flight over all requests of this process (one per worker).
        self.worker_pixels = WorkerPixelLimit(settings.max_worker_pixels, settings.retry_after_s)
        self._batchers: dict[tuple[str, int], DynamicBatcher] = {}
        self._batchers_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._observers: list[PredictionObserver] = []
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, *, poll: bool = True) -> InferenceService:
        """Load what the repository offers now, then keep following it in the background."""
        self.refresh()
        if poll and self._poller is None:
            self._poller = threading.Thread(
                target=self._poll, name="repository-poller", daemon=True
            )
            self._poller.start()
        return self

    def close(self) -> None:
        """Stop polling; queued requests still finish. Observers with a ``close`` stop too."""
        self._stop.set()
        self.metrics.ready_processes.set(0)
        if self._poller is not None:
            self._poller.join(timeout=10)
        for observer in self._observers:
            closer = getattr(observer, "close", None)
            if callable(closer):
                closer()
        with self._batchers_lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for b in batchers:
            b.close(wait=True, timeout=10)
        self.backend.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # keep following the repository whatever one poll hit
                log.exception("repository poll failed")

    def refresh(self) -> None:
        """One poll: scan the repository, sync the backend, publish labels that can be served."""
        with self._refresh_lock:
            snapshot = self.catalog.scan()
            self.backend.sync(snapshot)
            available = {
                name: sorted(v for v in versions if name in snapshot.models)
                for name, versions in self.backend.available().items()
            }
            old = self._state
            labels: dict[str, dict[str, int]] = {}
            for name, entry in snapshot.models.items():
                live = set(available.get(name, ()))
                effective: dict[str, int] = {}
                for label, version in entry.labels.items():
                    previous = old.labels.get(name, {}).get(label)
                    # A label moves only once its new target serves; until then it
                    # stays where it was, so a flip never routes requests into a gap.
                    if version not in live and previous in live:
                        effective[label] = previous  # type: ignore[assignment]
                    else:
                        effective[label] = version
                labels[name] = effective
            ok, reason = self.backend.check()
            self._state = _State(snapshot, available, labels, ok, reason)
            if not self._stop.is_set():
                self.metrics.ready_processes.set(1 if self.readiness()[0] else 0)
            live_keys = {(n, v) for n, vs in available.items() for v in vs}
            with self._batchers_lock:
                retired = [k for k in self._batchers if k not in live_keys]
                for key in retired:
                    # Closing stops new work; what is queued still runs on the
                    # servable the batcher holds, and drains the depth gauge.
                    self._batchers.pop(key).close()

    def add_observer(self, observer: PredictionObserver) -> None:
        """Register an observer of every successful prediction (see :class:`PredictionEvent`)."""
        self._observers = [*self._observers, observer]

    def remove_observer(self, observer: PredictionObserver) -> None:
        """Unregister an observer (no error if it was not registered)."""
        self._observers = [o for o in self._observers if o is not observer]

    # -- inference ---------------------------------------------------------------------
    def classify(
        self, images: Sequence[bytes], options: PredictOptions, request_id: str
    ) -> ClassifyResult:
        """Labels with scores for each image, best first."""
        result = self._infer(CLASSIFICATION, images, options, request_id).result
        assert isinstance(result, ClassifyResult)
        return result

    def detect(
        self, images: Sequence[bytes], options: PredictOptions, request_id: str
    ) -> DetectResult:
        """Objects with scores and boxes in original pixels for each image."""
        result = self._infer(DETECTION, images, options, request_id).result
        assert isinstance(result, DetectResult)
        return result

    def predict(
        self, images: Sequence[bytes], options: PredictOptions, request_id: str
    ) -> PredictResult:
        """Every signature output per image (TF Serving's Predict), beside the result that
        :meth:`classify` or :meth:`detect` gives for the named model's task."""
        return self._infer(None, images, options, request_id)

    def predict_tensor(
        self, task: str, inputs: np.ndarray, options: PredictOptions, request_id: str
    ) -> TensorResult:
        """The signature's own outputs for inputs already preprocessed per the model card.

        ``inputs`` is float32 ``[n, H, W, 3]`` (H, W of the selected version); it is
        batched, measured and observed exactly as decoded images are.
        """
        result = self._infer(task, inputs, options, request_id).result
        assert isinstance(result, TensorResult)
        return result

    def task_of(self, name: str) -> str | None:
        """The task of model ``name`` (None when its cards do not say); 404 if not served."""
        entry = self._state.snapshot.models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not served")
        return entry.task

    def model_for(self, task: str, options: PredictOptions) -> str:
        """The model name a request would be answered by ('' when it cannot be resolved)."""
        try:
            return options.model or self._default_model(task, self._state)
        except (ModelNotFound, InvalidParameter):
            return ""

    def known_model(self, name: str | None) -> str:
        """``name`` if the repository has it, else '' (for bounded metric labels)."""
        return name if name and name in self._state.snapshot.models else ""

    def _infer(
        self,
        task: str | None,
        images: Sequence[bytes] | np.ndarray,
        options: PredictOptions,
        request_id: str,
    ) -> PredictResult:
        start = time.monotonic()
        limit = self.settings.request_timeout_s
        deadline = start + min(options.timeout_s or limit, limit)
        tensor = isinstance(images, np.ndarray)
        if not len(images):
            raise BadRequest("the request carries no image")
        if len(images) > self.settings.max_images_per_request:
            raise TooManyImages(
                f"{len(images)} images in one request, limit is "
                f"{self.settings.max_images_per_request}"
            )
        pixels: Sequence[int] = ()
        if not tensor:
            pixels = check_pixel_budget(
                images,
                max_request_pixels=self.settings.max_request_pixels,
                max_image_pixels=self.settings.max_image_pixels,
            )
        for attempt in range(2):
            mv, batcher = self._select(task, options)
            timing = StageTiming()
            batcher.announce()
            try:
                if tensor:
                    inputs, geometries = checked_tensor(mv, images), []
                else:
                    inputs, geometries = preprocess_images(
                        mv, images, pixels, self.settings, self.worker_pixels, timing, deadline
                    )
            except BaseException:
                batcher.withdraw()
                raise
            try:
                batch = batcher.run(
                    inputs, deadline=deadline, request_id=request_id, announced=True
                )
                break
            except BatcherClosed:
                # The version left service between selection and queueing; select again
                # (the same explicit version then reports 404/503 as it should).
                if attempt:
                    raise
        timing.add("queue", batch.queue_s)
        timing.add("predict", batch.predict_s)
        t0 = time.perf_counter()
        state = self._state
        ref = ModelRef(mv.name, mv.version, state.labels_of(mv.name, mv.version))
        result: ClassifyResult | DetectResult | TensorResult
        if tensor:
            result = TensorResult(request_id, ref, dict(batch.outputs))
        elif mv.task == CLASSIFICATION:
            result = ClassifyResult(request_id, ref, classifications(mv, batch.outputs, options))
        else:
            result = DetectResult(
                request_id,
                ref,
                detections(
                    mv, batch.outputs, geometries, options, self.settings.detection_score_threshold
                ),
            )
        timing.add("postprocess", time.perf_counter() - t0)
        for stage, seconds in timing.stages.items():
            self.metrics.observe_stage(stage, mv.name, seconds)
        self.metrics.images.labels(mv.name).inc(len(images))
        if self._observers:
            event = PredictionEvent(
                request_id, mv.task, mv, inputs, batch.outputs, result, tuple(geometries)
            )
            for observer in self._observers:
                try:
                    observer.on_prediction(event)
                except Exception:  # an observer must never fail a served request
                    log.exception("prediction observer %r failed", observer)
        return PredictResult(result, batch.outputs)

    # -- version selection -------------------------------------------------------------
    def _default_model(self, task: str, state: _State) -> str:
        configured = (
            self.settings.default_classifier
            if task == CLASSIFICATION
            else self.settings.default_detector
        )
        if configured:
            return configured
        names = [n for n, e in state.snapshot.models.items() if e.task == task]
        if len(names) == 1:
            return names[0]
        if not names:
            raise ModelNotFound(f"no {task} model is served")
        raise InvalidParameter(
            f"several {task} models are served ({', '.join(sorted(names))}); name one with 'model'"
        )

    def _select(
        self, task: str | None, options: PredictOptions
    ) -> tuple[ModelVersion, DynamicBatcher]:
        mv = self.resolve(options, task)
        servable = self.backend.servable(mv.name, mv.version)
        if servable is None:
            raise ServiceUnavailable(
                f"version {mv.version} of {mv.name!r} left service",
                retry_after=self.settings.retry_after_s,
            )
        return mv, self._batcher(mv, servable)

    def resolve(self, options: PredictOptions, task: str | None = None) -> ModelVersion:
        """The version a request with ``options`` is answered by (a ``task`` model if given)."""
        state = self._state
        if task is None and not options.model:
            raise InvalidParameter("name the model")
        name = options.model or self._default_model(task, state)  # type: ignore[arg-type]
        entry = state.snapshot.models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not served")
        if task is not None and entry.task is not None and entry.task != task:
            other = "detect" if entry.task == DETECTION else "classify"
            raise InvalidParameter(f"model {name!r} is a {entry.task} model; use /v1/{other}")
        live = state.available.get(name, ())
        retry = self.settings.retry_after_s
        if options.version is not None:
            version = options.version
            if version not in live:
                if version in entry.versions:
                    raise ServiceUnavailable(
                        f"version {version} of {name!r} is not loaded yet", retry_after=retry
                    )
                raise VersionNotFound(f"model {name!r} has no version {version} in service")
        elif options.label:
            target = state.labels.get(name, {}).get(options.label)
            if target is None:
                raise LabelNotFound(f"model {name!r} has no version label {options.label!r}")
            if target not in live:
                raise ServiceUnavailable(
                    f"version {target} ({options.label}) of {name!r} is not loaded yet",
                    retry_after=retry,
                )
            version = target
        else:
            if not live:
                raise ServiceUnavailable(f"no version of {name!r} is loaded", retry_after=retry)
            default = state.labels.get(name, {}).get(self.settings.default_label)
            version = default if default in live else max(live)
        mv = entry.versions.get(version)
        if mv is None:
            raise ServiceUnavailable(
                f"version {version} of {name!r} left service", retry_after=retry
            )
        return mv

    def _batcher(self, mv: ModelVersion, servable: Any) -> DynamicBatcher:
        key = (mv.name, mv.version)
        batcher = self._batchers.get(key)
        if batcher is not None:
            return batcher
        with self._batchers_lock:
            batcher = self._batchers.get(key)
            if batcher is None:
                s = self.settings
                depth = self.metrics.queue_depth.labels(mv.name)
                sizes = self.metrics.batch_size.labels(mv.name)
                batcher = DynamicBatcher(
                    lambda x, timeout, ids: servable.predict(x, timeout=timeout, request_ids=ids),
                    max_batch_size=s.max_batch_size,
                    batch_timeout_s=s.batch_timeout_micros / 1e6,
                    capacity=s.queue_capacity,
                    num_threads=s.batch_threads,
                    retry_after_s=s.retry_after_s,
                    name=f"{mv.name}/{mv.version}",
                    hooks=BatcherHooks(queue_depth=depth.inc, batch_size=sizes.observe),
                )
                self._batchers[key] = batcher
        return batcher

    # -- models and health -------------------------------------------------------------
    def versions_in_service(self) -> list[tuple[str, int, list[str]]]:
        """(model, version, labels) for every version serving now (metrics, listings)."""
        state = self._state
        return [
            (name, v, state.labels_of(name, v))
            for name, versions in sorted(state.available.items())
            for v in versions
        ]

    def list_models(self) -> list[dict[str, Any]]:
        """Every model: task, versions with state and labels (no model cards)."""
        return [self._describe(name, cards=False) for name in sorted(self._state.snapshot.models)]

    def describe_model(self, name: str) -> dict[str, Any]:
        """One model with its versions' states, labels and model cards."""
        if name not in self._state.snapshot.models:
            raise ModelNotFound(f"model {name!r} is not served")
        return self._describe(name, cards=True)

    def _describe(self, name: str, *, cards: bool) -> dict[str, Any]:
        state = self._state
        entry = state.snapshot.models[name]
        statuses = {s.version: s for s in self.backend.status(name)}
        live = set(state.available.get(name, ()))
        versions = []
        for v in sorted(set(entry.versions) | set(statuses) | set(entry.errors)):
            status = statuses.get(v)
            item: dict[str, Any] = {
                "version": v,
                "state": AVAILABLE if v in live else (status.state if status else "START"),
                "labels": state.labels_of(name, v),
            }
            error = (status.error if status else "") or entry.errors.get(v, "")
            if error:
                item["error"] = error
            if cards and v in entry.versions:
                item["model_card"] = entry.versions[v].card.to_json()
            versions.append(item)
        default = state.labels.get(name, {}).get(self.settings.default_label)
        if default not in live:
            default = max(live, default=None)
        newest = entry.versions.get(default) if default is not None else None
        newest = newest or (entry.versions[max(entry.versions)] if entry.versions else None)
        return {
            "name": name,
            "task": entry.task,
            "default_version": default,
            "version_labels": dict(sorted(state.labels.get(name, {}).items())),
            "class_labels": newest.class_labels if newest else [],
            "versions": versions,
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): ready when the backend answers and some model version serves."""
        state = self._state
        serving = {n: list(v) for n, v in state.available.items() if v}
        reasons = []
        if state.snapshot.config_error:
            reasons.append(state.snapshot.config_error)
        if not state.backend_ok:
            reasons.append(f"backend {self.backend.name} unreachable: {state.backend_reason}")
        if not serving:
            reasons.append("no model version is loaded")
        details = {
            "backend": self.backend.name,
            "backend_reachable": state.backend_ok,
            "models": serving,
        }
        if reasons:
            details["reasons"] = reasons
        return not reasons, details
