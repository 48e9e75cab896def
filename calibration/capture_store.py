"""The capture store: sampled serving inputs on disk, joined with ground-truth feedback.

The gateway (several gunicorn worker processes at once) writes; the calibrator
reads. Nothing is shared in memory: every coordination goes through the
filesystem, with atomic renames and links and one advisory lock for eviction.

Layout, one directory per model under the store root::

    <root>/<model>/shards/<time_ns>-<pid>-<token>.npz   one captured request, immutable
    <root>/<model>/index/<h[:2]>/<h>.json               request id -> shard  (h = sha256 of id)
    <root>/<model>/feedback/<h[:2]>/<h>.json            ground truth for a request id
    <root>/<model>/expired/<time_ns>-<shard>.ids        ids of evicted shards, forgotten later

Crash safety: a shard is written to a ``.tmp-*`` file, flushed, fsynced and
renamed into place; readers list only finished ``*.npz`` names, so a half-written
shard is never read (a crashed writer leaves a temp file that eviction removes).
Feedback is created with ``os.link`` of a finished temp file, which fails if the
name exists: the first label for a request id wins atomically across processes,
a repeat of the same label is a no-op and a different one is a conflict.

Size cap: after each write the writer, holding an advisory lock (one evictor at
a time), sums the shard sizes and deletes the oldest shards until the total is
under ``max_bytes``; ``max_age_seconds`` drops old
shards too. A request id whose shard was dropped is *expired* (feedback raises
:class:`ExpiredRequestError`) for ``forget_after_seconds``, then unknown
(:class:`UnknownRequestError`) like an id never captured.

A shard holds one sampled request (all its images): ``inputs`` (float32 model
input, exactly what the model saw), ``request_id``, ``model``, ``version``,
``captured_at`` (unix seconds), ``predictions`` (the served prediction per
image, e.g. the class index) and, only when the store keeps raw bytes,
``raw_bytes``/``raw_offsets`` with the client's encoded images. Requests whose
images were decoded by the gateway also carry ``geometry`` (float64 ``[n, 8]``,
one :meth:`contract.preprocessing.ImageGeometry.to_array` row per image: how each
original image maps into the model input) and ``task`` ("classification" or
"detection"); the index entry repeats ``task`` and whether the shard has a
geometry. Box feedback (see :mod:`calibration.feedback`) needs both; shards
written before them can take image labels only.

This module holds the layout and the writer (:class:`SampleStore`);
:mod:`calibration.feedback` records and reads feedback, and
:mod:`calibration.samples` reads the samples back with their feedback.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import re
import secrets
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from contract.errors import DomainError
from contract.preprocessing import ImageGeometry

SHARDS = "shards"
INDEX = "index"
FEEDBACK = "feedback"
EXPIRED = "expired"
TMP_PREFIX = ".tmp-"
#: A model name is a directory name: no separators, no leading dot.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAX_REQUEST_ID = 256
#: Temp files older than this belong to a writer that crashed.
_STALE_TMP_SECONDS = 3600.0
#: What a capture's ``task`` may be (the model card's task names).
TASKS = ("classification", "detection")

Label = str | int


class SampleStoreError(DomainError):
    """Base class of capture-store errors."""

    code, title = "sample_store_error", "Capture store error"


class InvalidFeedbackError(SampleStoreError, ValueError):
    """Feedback that cannot be recorded as given (bad id, labels or count)."""

    code, title = "invalid_feedback", "Invalid feedback"


class UnknownRequestError(SampleStoreError, KeyError):
    """No captured sample has this request id (never sampled, or forgotten)."""

    code, title = "unknown_request_id", "Unknown request id"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ExpiredRequestError(SampleStoreError):
    """The request was captured, but its sample has been dropped (size cap or age)."""

    code, title = "expired_request_id", "Expired request id"


class FeedbackConflictError(SampleStoreError):
    """Feedback for this request id was already recorded with different labels."""

    code, title = "feedback_conflict", "Feedback conflict"


def check_model(model: str) -> str:
    """``model`` if it is a valid store directory name; InvalidFeedbackError if not."""
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise InvalidFeedbackError(f"invalid model name {model!r}")
    return model


def check_request_id(request_id: str) -> str:
    """``request_id`` if the store can key it; InvalidFeedbackError if not."""
    if not isinstance(request_id, str) or not request_id or len(request_id) > _MAX_REQUEST_ID:
        raise InvalidFeedbackError(
            f"request id must be a non-empty string of at most {_MAX_REQUEST_ID} characters"
        )
    if any(ord(c) < 32 for c in request_id):
        raise InvalidFeedbackError("request id must not contain control characters")
    return request_id


def _key(request_id: str) -> str:
    # Hashed names: any request id string becomes a safe, fixed-length file name.
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()


def keyed_path(root: Path, request_id: str) -> Path:
    """The file of ``request_id`` under an ``index`` or ``feedback`` directory."""
    h = _key(request_id)
    return root / h[:2] / f"{h}.json"


def fsync_dir(path: Path) -> None:
    """Make a rename or link in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, *, durable: bool) -> None:
    """Write ``data`` to ``path`` by temp file + rename (readers see all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


class SampleStore:
    """The writer: samples requests at a rate and captures them into the store.

    ``rate`` is the fraction of requests captured (0 turns capture off), either
    one number for every model or a mapping model -> rate (key ``"*"`` is the
    default for unlisted models). ``enabled=False`` is the off switch regardless
    of rates. ``max_bytes`` caps the shard bytes per model, oldest dropped first;
    ``max_age_seconds`` drops shards older than that. Raw client image bytes are
    stored only with ``keep_raw=True``.

    Safe to construct in every gunicorn worker: the object holds configuration
    and a random generator only, no state shared between processes.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        rate: float | Mapping[str, float] = 0.0,
        max_bytes: int = 1 << 30,
        max_age_seconds: float | None = None,
        forget_after_seconds: float = 7 * 86400.0,
        keep_raw: bool = False,
        enabled: bool = True,
        seed: int | None = None,
    ) -> None:
        rates = dict(rate) if isinstance(rate, Mapping) else {"*": float(rate)}
        for model, r in rates.items():
            if not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"sampling rate for {model!r} must be in [0, 1], got {r}")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if max_age_seconds is not None and max_age_seconds <= 0:
            raise ValueError("max_age_seconds must be positive")
        self.directory = Path(directory)
        self.rates = {k: float(v) for k, v in rates.items()}
        self.max_bytes = int(max_bytes)
        self.max_age_seconds = max_age_seconds
        self.forget_after_seconds = float(forget_after_seconds)
        self.keep_raw = bool(keep_raw)
        self.enabled = bool(enabled)
        self._random = random.Random(seed)

    def rate_for(self, model: str) -> float:
        """The sampling rate that applies to ``model`` (0 when capture is off)."""
        if not self.enabled:
            return 0.0
        return self.rates.get(model, self.rates.get("*", 0.0))

    def should_capture(self, model: str) -> bool:
        """The sampling decision for one request of ``model``."""
        r = self.rate_for(model)
        return r >= 1.0 or (r > 0.0 and self._random.random() < r)

    def model_dir(self, model: str) -> Path:
        """The store directory of ``model`` (its name checked)."""
        return self.directory / check_model(model)

    def capture(
        self,
        model: str,
        version: int,
        request_id: str,
        inputs: np.ndarray,
        predictions: np.ndarray | Sequence[Any] | None = None,
        *,
        raw: Sequence[bytes] | None = None,
        force: bool = False,
        geometry: Sequence[ImageGeometry] | np.ndarray | None = None,
        task: str | None = None,
    ) -> Path | None:
        """Sample one request and, if chosen (or ``force``), write it as a shard.

        ``inputs`` is the preprocessed batch the model saw (``[n, H, W, C]``);
        ``predictions`` one served prediction per image; ``raw`` the client's
        encoded images, kept only if the store keeps raw bytes; ``geometry`` how
        each original image maps into the input (one :class:`ImageGeometry` or
        ``to_array()`` row per image; None when the inputs came as a tensor);
        ``task`` the served model's task. Returns the shard path, or None when
        the request was not sampled.
        """
        if not force and not self.should_capture(model):
            return None
        check_request_id(request_id)
        x = np.asarray(inputs, dtype=np.float32)
        if x.ndim != 4 or x.shape[0] < 1:
            raise ValueError(f"inputs must be a non-empty [n, H, W, C] batch, got shape {x.shape}")
        arrays = self._shard_arrays(model, version, request_id, x, predictions, raw)
        if geometry is not None:
            arrays["geometry"] = _geometry_array(geometry, x.shape[0])
        if task is not None:
            if task not in TASKS:
                raise ValueError(f"task must be one of {TASKS}, got {task!r}")
            arrays["task"] = np.array(task)
        mdir = self.model_dir(model)
        shards = mdir / SHARDS
        shards.mkdir(parents=True, exist_ok=True)
        # Zero-padded nanoseconds first: name order is capture order (eviction order).
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.npz"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        _write_atomic(shards / name, buf.getvalue(), durable=True)
        # The index entry follows the shard: feedback that arrives in between finds an
        # unknown id for a moment, never a pointer to a shard that does not exist yet.
        entry = {
            "request_id": request_id,
            "shard": name,
            "images": int(x.shape[0]),
            "version": int(version),
            "captured_at": float(arrays["captured_at"]),
            "task": task,
            "geometry": "geometry" in arrays,
        }
        _write_atomic(
            keyed_path(mdir / INDEX, request_id), json.dumps(entry).encode(), durable=False
        )
        self.enforce_limits(model)
        return shards / name

    def _shard_arrays(
        self,
        model: str,
        version: int,
        request_id: str,
        x: np.ndarray,
        predictions: np.ndarray | Sequence[Any] | None,
        raw: Sequence[bytes] | None,
    ) -> dict[str, np.ndarray]:
        """The arrays of one shard (raw bytes only when the store keeps them)."""
        arrays: dict[str, np.ndarray] = {
            "inputs": x,
            "request_id": np.array(request_id),
            "model": np.array(model),
            "version": np.array(int(version), dtype=np.int64),
            "captured_at": np.array(time.time(), dtype=np.float64),
        }
        if predictions is not None:
            p = np.asarray(predictions)
            if p.dtype == object or p.shape[:1] != (x.shape[0],):
                raise ValueError("predictions must be a numeric array with one entry per image")
            arrays["predictions"] = p
        if raw is not None and self.keep_raw:
            if len(raw) != x.shape[0]:
                raise ValueError("raw must hold one encoded image per input")
            lengths = np.array([len(b) for b in raw], dtype=np.int64)
            arrays["raw_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            arrays["raw_bytes"] = np.frombuffer(b"".join(raw), dtype=np.uint8)
        return arrays

    def enforce_limits(self, model: str) -> int:
        """Drop the oldest shards beyond the size cap or age limit; returns how many.

        Evictions are serialised by an advisory lock and each pass lists the
        shards afresh, so once every writer has returned the total is within the
        cap (a pass costs one directory listing; writers wait at most that long).
        """
        mdir = self.model_dir(model)
        (mdir / SHARDS).mkdir(parents=True, exist_ok=True)
        with open(mdir / ".evict.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._evict(mdir)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _evict(self, mdir: Path) -> int:
        now = time.time()
        shards: list[tuple[str, int]] = []
        with os.scandir(mdir / SHARDS) as it:
            for e in it:
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if e.name.startswith(TMP_PREFIX):
                    if now - st.st_mtime > _STALE_TMP_SECONDS:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(e.path)
                    continue
                if e.name.endswith(".npz"):
                    shards.append((e.name, st.st_size))
        shards.sort()
        total = sum(size for _, size in shards)
        cutoff_ns = (
            None if self.max_age_seconds is None else int((now - self.max_age_seconds) * 1e9)
        )
        dropped = 0
        for name, size in shards:
            too_old = cutoff_ns is not None and shard_time_ns(name) < cutoff_ns
            if total <= self.max_bytes and not too_old:
                break
            self._drop_shard(mdir, name)
            total -= size
            dropped += 1
        self._forget_expired(mdir, now)
        return dropped

    def _drop_shard(self, mdir: Path, name: str) -> None:
        path = mdir / SHARDS / name
        try:
            ids = [str(v) for v in np.atleast_1d(_read_shard_field(path, "request_id"))]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            ids = []
        # The tombstone is written before the shard goes, so a crash in between
        # leaves an id that still has its sample, never one that is forgotten early.
        tomb = mdir / EXPIRED / f"{time.time_ns():020d}-{name}.ids"
        _write_atomic(tomb, "\n".join(ids).encode(), durable=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _forget_expired(self, mdir: Path, now: float) -> None:
        edir = mdir / EXPIRED
        if not edir.is_dir():
            return
        cutoff_ns = int((now - self.forget_after_seconds) * 1e9)
        for tomb in sorted(edir.iterdir()):
            if tomb.name.startswith(TMP_PREFIX) or shard_time_ns(tomb.name) >= cutoff_ns:
                continue
            for rid in tomb.read_text().splitlines():
                for sub in (INDEX, FEEDBACK):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(keyed_path(mdir / sub, rid))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tomb)


def _geometry_array(geometry: Sequence[ImageGeometry] | np.ndarray, n: int) -> np.ndarray:
    """``geometry`` as the shard's float64 ``[n, 8]``; ValueError unless one row per image."""
    if isinstance(geometry, np.ndarray):
        g = np.asarray(geometry, dtype=np.float64)
    else:
        g = np.array([ImageGeometry.to_array(x) for x in geometry], dtype=np.float64)
    if g.shape != (n, 8) or not np.isfinite(g).all():
        raise ValueError(f"geometry must be {n} row(s) of 8 finite numbers, got shape {g.shape}")
    for row in g:
        ImageGeometry.from_array(row)  # the fields parse back
    return g


def read_geometry(path: Path) -> np.ndarray | None:
    """The ``[n, 8]`` geometry of a shard, or None for a shard written without one."""
    with np.load(path, allow_pickle=False) as z:
        return z["geometry"] if "geometry" in z.files else None


def shard_time_ns(name: str) -> int:
    """The capture time a shard (or tombstone) name starts with, in ns (0 if none)."""
    head = name.split("-", 1)[0]
    return int(head) if head.isascii() and head.isdigit() else 0


def _read_shard_field(path: Path, field: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z[field]


def model_names(store_dir: str | os.PathLike[str]) -> list[str]:
    """Models that have a directory in the store, sorted."""
    root = Path(store_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _MODEL_NAME.match(p.name))
