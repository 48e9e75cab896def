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
shards too. A request id whose shard was dropped is *expired* (feedback answers
410) for ``forget_after_seconds``, then unknown (404) like an id never captured.

A shard holds one sampled request (all its images): ``inputs`` (float32 model
input, exactly what the model saw), ``request_id``, ``model``, ``version``,
``captured_at`` (unix seconds), ``predictions`` (the served prediction per
image, e.g. the class index) and, only when the store keeps raw bytes,
``raw_bytes``/``raw_offsets`` with the client's encoded images.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.errors import DomainError

SHARDS = "shards"
INDEX = "index"
FEEDBACK = "feedback"
EXPIRED = "expired"
_TMP_PREFIX = ".tmp-"
#: A model name is a directory name: no separators, no leading dot.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAX_REQUEST_ID = 256
#: Temp files older than this belong to a writer that crashed.
_STALE_TMP_SECONDS = 3600.0

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


@dataclass(frozen=True)
class FeedbackResult:
    """What :func:`record_feedback` did: ``created`` is False for an idempotent repeat."""

    model: str
    request_id: str
    labels: tuple[Label, ...]
    created: bool


@dataclass(frozen=True)
class Sample:
    """One captured image, with its ground truth when feedback has arrived."""

    model: str
    request_id: str
    index: int  # position of the image in its request
    version: int
    captured_at: float
    input: np.ndarray  # float32 model input (H, W, C)
    prediction: np.ndarray | None
    label: Label | None
    raw: bytes | None


@dataclass
class SampleSet:
    """Captured images as arrays (what calibration consumes)."""

    inputs: np.ndarray  # [n, H, W, C] float32
    labels: list[Label | None]
    request_ids: list[str]
    versions: np.ndarray  # [n] int
    captured_at: np.ndarray  # [n] float64
    predictions: list[np.ndarray | None]
    skipped: dict[str, int]

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of the images that have ground truth."""
        return np.array([lab is not None for lab in self.labels], dtype=bool)


def _check_model(model: str) -> str:
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise InvalidFeedbackError(f"invalid model name {model!r}")
    return model


def _check_request_id(request_id: str) -> str:
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


def _keyed_path(root: Path, request_id: str) -> Path:
    h = _key(request_id)
    return root / h[:2] / f"{h}.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, *, durable: bool) -> None:
    """Write ``data`` to ``path`` by temp file + rename (readers see all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{path.name}")
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
        _fsync_dir(path.parent)


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
        return self.directory / _check_model(model)

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
    ) -> Path | None:
        """Sample one request and, if chosen (or ``force``), write it as a shard.

        ``inputs`` is the preprocessed batch the model saw (``[n, H, W, C]``);
        ``predictions`` one served prediction per image; ``raw`` the client's
        encoded images, kept only if the store keeps raw bytes. Returns the shard
        path, or None when the request was not sampled.
        """
        if not force and not self.should_capture(model):
            return None
        _check_request_id(request_id)
        x = np.asarray(inputs, dtype=np.float32)
        if x.ndim != 4 or x.shape[0] < 1:
            raise ValueError(f"inputs must be a non-empty [n, H, W, C] batch, got shape {x.shape}")
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

        mdir = self.model_dir(model)
        shards = mdir / SHARDS
        shards.mkdir(parents=True, exist_ok=True)
        # Zero-padded nanoseconds first: name order is capture order (eviction order).
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.npz"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        _write_atomic(shards / name, buf.getvalue(), durable=True)
        # The index entry follows the shard: feedback that arrives in between gets a
        # 404 for a moment, never a pointer to a shard that does not exist yet.
        entry = {
            "request_id": request_id,
            "shard": name,
            "images": int(x.shape[0]),
            "version": int(version),
            "captured_at": float(arrays["captured_at"]),
        }
        _write_atomic(
            _keyed_path(mdir / INDEX, request_id), json.dumps(entry).encode(), durable=False
        )
        self.enforce_limits(model)
        return shards / name

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
                if e.name.startswith(_TMP_PREFIX):
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
            too_old = cutoff_ns is not None and _shard_time_ns(name) < cutoff_ns
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
            if tomb.name.startswith(_TMP_PREFIX) or _shard_time_ns(tomb.name) >= cutoff_ns:
                continue
            for rid in tomb.read_text().splitlines():
                for sub in (INDEX, FEEDBACK):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_keyed_path(mdir / sub, rid))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tomb)


def _shard_time_ns(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _read_shard_field(path: Path, field: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z[field]


def model_names(store_dir: str | os.PathLike[str]) -> list[str]:
    """Models that have a directory in the store, sorted."""
    root = Path(store_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _MODEL_NAME.match(p.name))


def _lookup(mdir: Path, request_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(_keyed_path(mdir / INDEX, request_id).read_text())
    except FileNotFoundError:
        return None


def _normalise_labels(labels: Sequence[Label] | Label) -> tuple[Label, ...]:
    if isinstance(labels, str | int) and not isinstance(labels, bool):
        labels = [labels]
    if not isinstance(labels, Sequence) or isinstance(labels, str | bytes) or not labels:
        raise InvalidFeedbackError("labels must be a non-empty list (one label per image)")
    out: list[Label] = []
    for lab in labels:
        if isinstance(lab, bool) or not isinstance(lab, str | int):
            raise InvalidFeedbackError(f"a label must be a class name or index, got {lab!r}")
        if isinstance(lab, int) and lab < 0:
            raise InvalidFeedbackError(f"a class index must be non-negative, got {lab}")
        if isinstance(lab, str) and not lab.strip():
            raise InvalidFeedbackError("a class name must not be empty")
        out.append(lab)
    return tuple(out)


def record_feedback(
    store_dir: str | os.PathLike[str],
    request_id: str,
    labels: Sequence[Label] | Label,
    *,
    model: str | None = None,
    allowed: Sequence[str] | None = None,
) -> FeedbackResult:
    """Join ground truth to a captured request: one label per image, in request order.

    ``model`` narrows the search (otherwise every model in the store is looked
    at); ``allowed`` are the valid class names (an int label must index them).

    Raises :class:`UnknownRequestError` (404) for an id that was never captured
    or has been forgotten, :class:`ExpiredRequestError` (410) when its sample
    was dropped, :class:`InvalidFeedbackError` (422) for malformed labels or a
    label count that does not match the captured images, and
    :class:`FeedbackConflictError` (409) when different labels were recorded
    before. The same labels twice is not an error (``created`` is False).
    """
    _check_request_id(request_id)
    labs = _normalise_labels(labels)
    if allowed is not None:
        for lab in labs:
            if isinstance(lab, str) and lab not in allowed:
                raise InvalidFeedbackError(
                    f"unknown label {lab!r}; expected one of {list(allowed)}"
                )
            if isinstance(lab, int) and lab >= len(allowed):
                raise InvalidFeedbackError(
                    f"class index {lab} out of range for {len(allowed)} classes"
                )
    root = Path(store_dir)
    models = [_check_model(model)] if model is not None else model_names(root)
    found: tuple[str, dict[str, Any]] | None = None
    for m in models:
        entry = _lookup(root / m, request_id)
        if entry is not None:
            found = (m, entry)
            break
    if found is None:
        raise UnknownRequestError(f"no captured sample has request id {request_id!r}")
    m, entry = found
    mdir = root / m
    if not (mdir / SHARDS / entry["shard"]).exists():
        raise ExpiredRequestError(
            f"the sample of request {request_id!r} has been dropped from the store (size or age limit)"
        )
    if len(labs) != int(entry["images"]):
        raise InvalidFeedbackError(
            f"request {request_id!r} had {entry['images']} image(s); got {len(labs)} label(s)"
        )
    record = {"request_id": request_id, "labels": list(labs), "recorded_at": time.time()}
    target = _keyed_path(mdir / FEEDBACK, request_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        # link() creates the name only if it does not exist: the first label wins,
        # atomically across processes, and the file appears complete.
        os.link(tmp, target)
        created = True
    except FileExistsError:
        created = False
    finally:
        os.unlink(tmp)
    if created:
        _fsync_dir(target.parent)
        return FeedbackResult(m, request_id, labs, True)
    existing = tuple(json.loads(target.read_text())["labels"])
    if existing != labs:
        raise FeedbackConflictError(
            f"request {request_id!r} already has labels {list(existing)}; got {list(labs)}"
        )
    return FeedbackResult(m, request_id, labs, False)


def read_feedback(mdir: Path, request_id: str) -> tuple[Label, ...] | None:
    """The recorded labels of a request in a model's store directory, or None."""
    try:
        return tuple(json.loads(_keyed_path(mdir / FEEDBACK, request_id).read_text())["labels"])
    except FileNotFoundError:
        return None


def iter_samples(
    store_dir: str | os.PathLike[str],
    model: str,
    *,
    labelled: bool | None = None,
    since: float | None = None,
    newest_first: bool = False,
    skipped: dict[str, int] | None = None,
) -> Iterator[Sample]:
    """Every captured image of ``model``, oldest first (or newest first).

    ``labelled=True`` yields only images with feedback, ``False`` only those
    without, None all. ``since`` (unix seconds) skips older captures. A shard
    that vanishes (evicted while reading) or cannot be parsed is skipped and
    counted in ``skipped``.
    """
    mdir = Path(store_dir) / _check_model(model)
    sdir = mdir / SHARDS
    if not sdir.is_dir():
        return
    names = sorted(
        (n for n in os.listdir(sdir) if n.endswith(".npz") and not n.startswith(_TMP_PREFIX)),
        reverse=newest_first,
    )
    skipped = skipped if skipped is not None else {}
    for name in names:
        if since is not None and _shard_time_ns(name) < since * 1e9:
            continue
        try:
            with np.load(sdir / name, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except FileNotFoundError:
            skipped["evicted"] = skipped.get("evicted", 0) + 1
            continue
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            continue
        request_id = str(data["request_id"])
        labels = read_feedback(mdir, request_id)
        if labelled is True and labels is None or labelled is False and labels is not None:
            continue
        x = data["inputs"]
        preds = data.get("predictions")
        raw_b, raw_o = data.get("raw_bytes"), data.get("raw_offsets")
        for i in range(x.shape[0]):
            raw = None
            if raw_b is not None and raw_o is not None:
                raw = raw_b[int(raw_o[i]) : int(raw_o[i + 1])].tobytes()
            yield Sample(
                model=model,
                request_id=request_id,
                index=i,
                version=int(data["version"]),
                captured_at=float(data["captured_at"]),
                input=x[i],
                prediction=None if preds is None else preds[i],
                label=None if labels is None or i >= len(labels) else labels[i],
                raw=raw,
            )


def load_samples(
    store_dir: str | os.PathLike[str],
    model: str,
    *,
    max_samples: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    since: float | None = None,
) -> SampleSet:
    """The newest ``max_samples`` captured images of ``model`` as arrays, oldest first.

    Images whose shape differs from ``input_shape`` (captured for a version
    with other preprocessing) are left out and counted in ``skipped``.
    """
    skipped: dict[str, int] = {}
    picked: list[Sample] = []
    for s in iter_samples(store_dir, model, since=since, newest_first=True, skipped=skipped):
        if input_shape is not None and tuple(s.input.shape) != tuple(input_shape):
            skipped["other_input_shape"] = skipped.get("other_input_shape", 0) + 1
            continue
        picked.append(s)
        if max_samples is not None and len(picked) >= max_samples:
            break
    picked.reverse()
    if picked:
        inputs = np.stack([s.input for s in picked]).astype(np.float32)
    else:
        inputs = np.zeros((0, *(input_shape or (0, 0, 0))), np.float32)
    return SampleSet(
        inputs=inputs,
        labels=[s.label for s in picked],
        request_ids=[s.request_id for s in picked],
        versions=np.array([s.version for s in picked], dtype=np.int64),
        captured_at=np.array([s.captured_at for s in picked], dtype=np.float64),
        predictions=[s.prediction for s in picked],
        skipped=skipped,
    )
