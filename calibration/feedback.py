"""Ground-truth feedback joined to captured requests (see :mod:`calibration.capture_store`).

Feedback is created with ``os.link`` of a finished temp file, which fails if
the name exists: the first label for a request id wins atomically across
processes, a repeat of the same label is a no-op and a different one is a
conflict.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.capture_store import (
    FEEDBACK,
    INDEX,
    SHARDS,
    TMP_PREFIX,
    ExpiredRequestError,
    FeedbackConflictError,
    InvalidFeedbackError,
    Label,
    UnknownRequestError,
    check_model,
    check_request_id,
    fsync_dir,
    keyed_path,
    model_names,
)


@dataclass(frozen=True)
class FeedbackResult:
    """What :func:`record_feedback` did: ``created`` is False for an idempotent repeat."""

    model: str
    request_id: str
    labels: tuple[Label, ...]
    created: bool


def _lookup(mdir: Path, request_id: str) -> dict[str, Any] | None:
    """The index entry of ``request_id`` in a model's store directory, or None."""
    try:
        return json.loads(keyed_path(mdir / INDEX, request_id).read_text())
    except FileNotFoundError:
        return None


def _normalise_labels(labels: Sequence[Label] | Label) -> tuple[Label, ...]:
    """Labels as a tuple of class names or non-negative indices; InvalidFeedbackError if not."""
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

    Raises :class:`UnknownRequestError` for an id that was never captured
    or has been forgotten, :class:`ExpiredRequestError` when its sample
    was dropped, :class:`InvalidFeedbackError` for malformed labels or a
    label count that does not match the captured images, and
    :class:`FeedbackConflictError` when different labels were recorded
    before. The same labels twice is not an error (``created`` is False).
    """
    check_request_id(request_id)
    labs = _normalise_labels(labels)
    if allowed is not None:
        _check_allowed(labs, allowed)
    m, entry = _find_capture(Path(store_dir), request_id, model)
    mdir = Path(store_dir) / m
    if not (mdir / SHARDS / entry["shard"]).exists():
        raise ExpiredRequestError(
            f"the sample of request {request_id!r} has been dropped from the store (size or age limit)"
        )
    if len(labs) != int(entry["images"]):
        raise InvalidFeedbackError(
            f"request {request_id!r} had {entry['images']} image(s); got {len(labs)} label(s)"
        )
    record = {"request_id": request_id, "labels": list(labs), "recorded_at": time.time()}
    target = keyed_path(mdir / FEEDBACK, request_id)
    if _link_first(target, json.dumps(record)):
        return FeedbackResult(m, request_id, labs, True)
    existing = tuple(json.loads(target.read_text())["labels"])
    if existing != labs:
        raise FeedbackConflictError(
            f"request {request_id!r} already has labels {list(existing)}; got {list(labs)}"
        )
    return FeedbackResult(m, request_id, labs, False)


def _check_allowed(labs: tuple[Label, ...], allowed: Sequence[str]) -> None:
    """InvalidFeedbackError for a class name not in ``allowed`` or an index beyond it."""
    for lab in labs:
        if isinstance(lab, str) and lab not in allowed:
            raise InvalidFeedbackError(f"unknown label {lab!r}; expected one of {list(allowed)}")
        if isinstance(lab, int) and lab >= len(allowed):
            raise InvalidFeedbackError(f"class index {lab} out of range for {len(allowed)} classes")


def _find_capture(root: Path, request_id: str, model: str | None) -> tuple[str, dict[str, Any]]:
    """The model and index entry of a captured request id; UnknownRequestError if none."""
    models = [check_model(model)] if model is not None else model_names(root)
    for m in models:
        entry = _lookup(root / m, request_id)
        if entry is not None:
            return m, entry
    raise UnknownRequestError(f"no captured sample has request id {request_id!r}")


def _link_first(target: Path, text: str) -> bool:
    """Create ``target`` holding ``text`` unless it exists; whether this call created it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    with open(tmp, "w") as fh:
        fh.write(text)
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
        fsync_dir(target.parent)
    return created


def read_feedback(mdir: Path, request_id: str) -> tuple[Label, ...] | None:
    """The recorded labels of a request in a model's store directory, or None."""
    try:
        return tuple(json.loads(keyed_path(mdir / FEEDBACK, request_id).read_text())["labels"])
    except FileNotFoundError:
        return None
