"""The ``embedded`` backend: SavedModels loaded in the gateway process.

Follows the repository like TF Serving: :meth:`EmbeddedBackend.sync` loads the
versions the version policy wants (replaying their warm-up records first) and
only then publishes them, and retires versions the policy dropped. Retiring
only removes the version from the map of servables; requests that already
hold its :class:`EmbeddedServable` finish on it, and Python frees the model
when the last one is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from contract.tf_environment import prepare_tensorflow_environment  # noqa: E402

prepare_tensorflow_environment()
import tensorflow as tf  # noqa: E402

from contract.model_card import WARMUP_RELPATH  # noqa: E402
from serving.backends.base import (  # noqa: E402
    AVAILABLE,
    END,
    LOADING,
    Backend,
    Servable,
    VersionStatus,
)
from serving.catalog import ModelVersion, RepositorySnapshot  # noqa: E402
from serving.errors import BackendError  # noqa: E402
from serving.settings import Settings  # noqa: E402

log = logging.getLogger(__name__)

_threads_configured = False


def configure_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """Set TensorFlow's thread pools once per process (before its runtime starts).

    Under gunicorn every worker is its own process; ``intra_op`` is sized so the
    workers together use each core once instead of each spawning a pool per core.
    """
    global _threads_configured
    if _threads_configured:
        return
    _threads_configured = True
    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as exc:
        # The runtime already started (e.g. a test process that trained a model first).
        log.info("TensorFlow thread pools already initialised: %s", exc)


def direct_signature(loaded: object, signature_name: str, input_name: str):
    """``loaded``'s signature as a one-input concrete function of our own, traced once.

    A restored signature resolves each of its captured variables on every call, in
    Python, in case it runs under a distribution strategy (``saved_model/load.py``,
    ``_WrapperFunction._call_flat``): about 1 ms per call with the GIL held for
    MobileNetV2's 262 captures on this project's 2-core machine, paid by every
    forward pass. A function that calls the signature resolves them once, when it is
    traced; its outputs are the signature's, bit for bit (``tests/serving``).
    """
    signature = loaded.signatures[signature_name]  # type: ignore[attr-defined]
    spec = signature.structured_input_signature[1][input_name]
    traced = tf.function(lambda x: signature(**{input_name: x}), autograph=False)
    return traced.get_concrete_function(tf.TensorSpec(spec.shape, spec.dtype, input_name))


class EmbeddedServable(Servable):
    """A loaded SavedModel's serving signature, called in-process."""

    def __init__(self, model: ModelVersion, loaded: object) -> None:
        super().__init__(model)
        # The loaded object owns the variables; keep it alive as long as the servable.
        self._loaded = loaded
        self._fn = direct_signature(loaded, model.signature_name, model.input_name)

    def predict(
        self, images: np.ndarray, *, timeout: float, request_ids: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Run the signature in-process; ``timeout`` cannot interrupt a local forward pass."""
        try:
            out = self._fn(tf.constant(images, dtype=tf.float32))
        except (tf.errors.OpError, ValueError, TypeError) as exc:
            # The gateway built the input from the card, so a failure here is the
            # model's or the card's, never the client's.
            raise BackendError(
                f"{self.model.name}/{self.model.version} failed: {_first_line(exc)}"
            ) from exc
        return {k: v.numpy() for k, v in out.items()}


class EmbeddedBackend(Backend):
    """SavedModels in-process, following the repository's version policies."""

    name = "embedded"

    def __init__(self, settings: Settings) -> None:
        configure_tensorflow_threads(settings.intra_op_threads(), settings.tf_inter_op_threads)
        self._warmup_records = settings.warmup_records
        self._servables: dict[tuple[str, int], EmbeddedServable] = {}
        self._status: dict[str, dict[int, VersionStatus]] = {}
        # Versions that failed to load, by directory mtime: retried only if the
        # directory changes, so a broken version is not reloaded on every poll.
        self._failed: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    # -- Backend -----------------------------------------------------------------
    def sync(self, snapshot: RepositorySnapshot) -> None:
        """Load wanted versions (warm-up first), then retire the ones no longer wanted."""
        wanted = {
            (name, v): entry.versions[v]
            for name, entry in snapshot.models.items()
            for v in entry.versions
        }
        for key in sorted(set(wanted) - set(self._servables)):
            mv = wanted[key]
            mtime = _mtime(mv)
            if self._failed.get(key) == mtime:
                continue
            self._set_status(mv.name, mv.version, LOADING)
            try:
                servable = self._load(mv)
            except Exception as exc:
                log.error("loading %s/%d failed: %s", mv.name, mv.version, exc)
                self._failed[key] = mtime
                self._set_status(mv.name, mv.version, END, f"load failed: {_first_line(exc)}")
                continue
            with self._lock:
                self._servables = {**self._servables, key: servable}
            self._set_status(mv.name, mv.version, AVAILABLE)
            log.info("serving %s version %d", mv.name, mv.version)
        retired = set(self._servables) - set(wanted)
        if retired:
            with self._lock:
                self._servables = {k: s for k, s in self._servables.items() if k not in retired}
            for name, version in retired:
                self._set_status(name, version, END)
                log.info("retired %s version %d", name, version)
        with self._lock:
            for name in list(self._status):
                if name not in snapshot.models and not any(k[0] == name for k in self._servables):
                    del self._status[name]
        for name, entry in snapshot.models.items():
            for version, error in entry.errors.items():
                self._set_status(name, version, END, error)

    def servable(self, name: str, version: int) -> EmbeddedServable | None:
        return self._servables.get((name, version))

    def available(self) -> Mapping[str, Sequence[int]]:
        out: dict[str, list[int]] = {}
        for name, version in sorted(self._servables):
            out.setdefault(name, []).append(version)
        return out

    def status(self, name: str) -> list[VersionStatus]:
        with self._lock:
            return [self._status[name][v] for v in sorted(self._status.get(name, {}))]

    def check(self) -> tuple[bool, str]:
        return True, "in-process"

    def close(self) -> None:
        with self._lock:
            self._servables = {}

    # -- loading -----------------------------------------------------------------
    def _set_status(self, name: str, version: int, state: str, error: str = "") -> None:
        with self._lock:
            self._status.setdefault(name, {})[version] = VersionStatus(version, state, error)

    def _load(self, mv: ModelVersion) -> EmbeddedServable:
        t0 = time.perf_counter()
        loaded = tf.saved_model.load(str(mv.path))
        servable = EmbeddedServable(mv, loaded)
        warmed = self._warmup(servable)
        log.info(
            "loaded %s/%d in %.1fs (%d warm-up requests)",
            mv.name,
            mv.version,
            time.perf_counter() - t0,
            warmed,
        )
        return servable

    def _warmup(self, servable: EmbeddedServable) -> int:
        """Replay the version's TF Serving warm-up records, so the first request is not slow."""
        path = servable.model.path / WARMUP_RELPATH
        if not path.exists() or self._warmup_records == 0:
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        count = 0
        for record in tf.data.TFRecordDataset(str(path)).take(self._warmup_records):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            inputs = entry.predict_log.request.inputs
            if servable.model.input_name not in inputs:
                continue
            batch = tf.make_ndarray(inputs[servable.model.input_name])
            servable.predict(batch.astype(np.float32), timeout=60.0)
            count += 1
        return count


def _mtime(mv: ModelVersion) -> float:
    try:
        return mv.path.stat().st_mtime
    except OSError:
        return -1.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
