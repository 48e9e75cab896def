"""Ground-truth feedback joined to captured requests (see :mod:`calibration.capture_store`).

Two kinds, one file per request id:

- image labels, ``{"request_id", "labels": [one per image], "recorded_at"}``
  (:func:`record_feedback`), for any captured request;
- boxes, ``{"request_id", "objects": [[{"label", "box", "input_box"}, ...] per
  image], "recorded_at"}`` (:func:`record_box_feedback`), for a captured detect
  request: ``box`` is (ymin, xmin, ymax, xmax) in the original image's pixels
  (what the detect response used), ``input_box`` the same box in model-input
  pixels, mapped by the captured :class:`~contract.preprocessing.ImageGeometry`
  (the arithmetic the response's boxes came through, inverted), ``label`` a
  class name. An empty list says the image shows no object.

Feedback is created with ``os.link`` of a finished temp file, which fails if
the name exists: the first feedback for a request id wins atomically across
processes, a repeat of the same feedback is a no-op and a different one
(other labels, other boxes, or boxes after labels) is a conflict.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    read_geometry,
)
from contract.preprocessing import ImageGeometry

#: How far (original pixels) a box may reach past the image's border; it is then
#: clipped to the border. Half a pixel absorbs rounding of pixel-centre
#: coordinates and of boxes read back from a response (which are clipped exactly).
BOX_TOLERANCE_PX = 0.5
#: A box's coordinates in order; a box may also be given as an object with these keys.
BOX_KEYS = ("ymin", "xmin", "ymax", "xmax")


@dataclass(frozen=True)
class FeedbackResult:
    """What :func:`record_feedback` / :func:`record_box_feedback` did.

    ``created`` is False for an idempotent repeat. ``objects`` (box feedback
    only, else None) holds per image the recorded objects, each
    ``{"label": name, "box": [4 original px], "input_box": [4 input px]}``;
    ``labels`` is empty then.
    """

    model: str
    request_id: str
    labels: tuple[Label, ...]
    created: bool
    objects: tuple[tuple[dict[str, Any], ...], ...] | None = None


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
    stored = json.loads(target.read_text())
    if "labels" not in stored:
        raise FeedbackConflictError(
            f"request {request_id!r} already has box feedback; got image labels {list(labs)}"
        )
    existing = tuple(stored["labels"])
    if existing != labs:
        raise FeedbackConflictError(
            f"request {request_id!r} already has labels {list(existing)}; got {list(labs)}"
        )
    return FeedbackResult(m, request_id, labs, False)


def record_box_feedback(
    store_dir: str | os.PathLike[str],
    request_id: str,
    objects: Sequence[Sequence[Mapping[str, Any]]],
    *,
    model: str | None = None,
    allowed: Sequence[str] | None = None,
) -> FeedbackResult:
    """Join boxes to a captured detect request: one list of objects per image, in order.

    Each object is ``{"label": class name or index, "box": [ymin, xmin, ymax, xmax]}``
    in the original (upright) image's pixels, the coordinates the detect response
    used (its ``{"ymin": ..., "xmin": ..., "ymax": ..., "xmax": ...}`` form is taken
    too); other keys (a ``score`` copied from a response) are ignored. A box may
    reach :data:`BOX_TOLERANCE_PX` past the border and is clipped to it. Labels are
    stored as class names: ``allowed`` (the model's labels) checks names and turns
    indices into names; without it only names are accepted, unchecked.

    Raises :class:`InvalidFeedbackError` for a malformed object, a box that is empty
    or outside the image, an unknown label, a list count that does not match the
    captured images, or a request that cannot take boxes (captured for a
    classifier, or without geometry); :class:`UnknownRequestError`,
    :class:`ExpiredRequestError` and :class:`FeedbackConflictError` as
    :func:`record_feedback` does. The same objects twice: ``created`` is False.
    """
    check_request_id(request_id)
    if not isinstance(objects, Sequence) or isinstance(objects, str | bytes) or not objects:
        raise InvalidFeedbackError(
            "objects must be a non-empty list with one list of objects per image"
        )
    m, entry = _find_capture(Path(store_dir), request_id, model)
    mdir = Path(store_dir) / m
    shard = mdir / SHARDS / entry["shard"]
    if entry.get("task") == "classification":
        raise InvalidFeedbackError(
            f"request {request_id!r} was a classification; box feedback needs a detect request"
        )
    try:
        geometry = read_geometry(shard)
    except FileNotFoundError:
        raise ExpiredRequestError(
            f"the sample of request {request_id!r} has been dropped from the store "
            "(size or age limit)"
        ) from None
    if geometry is None:
        raise InvalidFeedbackError(
            f"request {request_id!r} was captured without image geometry "
            "(a tensor request, or an older capture): it takes image labels only"
        )
    if len(objects) != int(entry["images"]):
        raise InvalidFeedbackError(
            f"request {request_id!r} had {entry['images']} image(s); "
            f"got {len(objects)} object list(s)"
        )
    per_image = tuple(
        _normalise_objects(i, objs, ImageGeometry.from_array(geometry[i]), allowed)
        for i, objs in enumerate(objects)
    )
    record = {"request_id": request_id, "objects": per_image, "recorded_at": time.time()}
    # Through JSON and back: what a repeat is compared with is what the file holds.
    per_image = tuple(tuple(objs) for objs in json.loads(json.dumps(per_image)))
    target = keyed_path(mdir / FEEDBACK, request_id)
    if _link_first(target, json.dumps(record)):
        return FeedbackResult(m, request_id, (), True, per_image)
    stored = json.loads(target.read_text())
    if "objects" not in stored:
        raise FeedbackConflictError(
            f"request {request_id!r} already has image labels {stored.get('labels')}; "
            "got box feedback"
        )
    existing = tuple(tuple(objs) for objs in stored["objects"])
    if _boxes_only(existing) != _boxes_only(per_image):
        raise FeedbackConflictError(
            f"request {request_id!r} already has different box feedback "
            f"{[[dict(label=o['label'], box=o['box']) for o in objs] for objs in existing]}"
        )
    return FeedbackResult(m, request_id, (), False, existing)


def _boxes_only(per_image: tuple[tuple[dict[str, Any], ...], ...]) -> list[list[tuple]]:
    """What makes two box feedbacks the same: labels and original-pixel boxes."""
    return [[(o["label"], tuple(o["box"])) for o in objs] for objs in per_image]


def _normalise_objects(
    image: int,
    objs: Any,
    geometry: ImageGeometry,
    allowed: Sequence[str] | None,
) -> tuple[dict[str, Any], ...]:
    """One image's objects checked against its size and the labels, with ``input_box``."""
    if not isinstance(objs, Sequence) or isinstance(objs, str | bytes):
        raise InvalidFeedbackError(
            f"objects[{image}] must be a list of objects (an empty list: no object)"
        )
    h, w = geometry.original_height, geometry.original_width
    out = []
    for j, obj in enumerate(objs):
        where = f"objects[{image}][{j}]"
        if not isinstance(obj, Mapping) or "label" not in obj or "box" not in obj:
            raise InvalidFeedbackError(f"{where} must be an object with 'label' and 'box'")
        label = _box_label(where, obj["label"], allowed)
        box = obj["box"]
        if isinstance(box, Mapping) and set(box) == set(BOX_KEYS):
            box = [box[k] for k in BOX_KEYS]  # the detect response's form
        elif isinstance(box, np.ndarray):
            box = box.tolist()
        if (
            not isinstance(box, Sequence)
            or isinstance(box, str | bytes)
            or len(box) != 4
            or not all(_is_number(v) and _finite(v) for v in box)
        ):
            raise InvalidFeedbackError(
                f"{where}.box must be 4 finite numbers [ymin, xmin, ymax, xmax], got {box!r}"
            )
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        if ymin >= ymax or xmin >= xmax:
            raise InvalidFeedbackError(
                f"{where}.box {list(box)} is empty: need ymin < ymax and xmin < xmax"
            )
        tol = BOX_TOLERANCE_PX
        if ymin < -tol or xmin < -tol or ymax > h + tol or xmax > w + tol:
            raise InvalidFeedbackError(
                f"{where}.box {list(box)} lies outside the {w}x{h} (width x height) image "
                "(original pixels, after EXIF rotation)"
            )
        clipped = [
            min(max(ymin, 0.0), h),
            min(max(xmin, 0.0), w),
            min(max(ymax, 0.0), h),
            min(max(xmax, 0.0), w),
        ]
        if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
            raise InvalidFeedbackError(f"{where}.box {list(box)} has no area inside the image")
        mapped = geometry.boxes_to_input(np.array([clipped]))[0]
        out.append({"label": label, "box": clipped, "input_box": [float(v) for v in mapped]})
    return tuple(out)


def _finite(v: Any) -> bool:
    """``v`` is finite as a float (a JSON integer past float's range is not)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_number(v: Any) -> bool:
    """A real number that is not a bool (JSON numbers, Python and NumPy scalars)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)


def _box_label(where: str, label: Any, allowed: Sequence[str] | None) -> str:
    """A box's label as a class name; InvalidFeedbackError if unknown or malformed."""
    if isinstance(label, bool | np.bool_) or not isinstance(label, str | numbers.Integral):
        raise InvalidFeedbackError(f"{where}.label must be a class name or index, got {label!r}")
    if isinstance(label, numbers.Integral):
        label = int(label)
        if allowed is None:
            raise InvalidFeedbackError(
                f"{where}.label {label} is an index, but the model's labels are not known: "
                "give the class name (or the model)"
            )
        if not 0 <= label < len(allowed):
            raise InvalidFeedbackError(
                f"{where}.label: class index {label} out of range for {len(allowed)} classes"
            )
        return str(allowed[label])
    if not label.strip():
        raise InvalidFeedbackError(f"{where}.label must not be empty")
    if allowed is not None and label not in allowed:
        raise InvalidFeedbackError(
            f"{where}.label: unknown label {label!r}; expected one of {list(allowed)}"
        )
    return label


def _check_allowed(labs: tuple[Label, ...], allowed: Sequence[str]) -> None:
    """InvalidFeedbackError for a class name not in ``allowed`` or an index beyond it."""
    for lab in labs:
        if isinstance(lab, str) and lab not in allowed:
            raise InvalidFeedbackError(f"unknown label {lab!r}; expected one of {list(allowed)}")
        if isinstance(lab, int) and lab >= len(allowed):
            raise InvalidFeedbackError(f"class index {lab} out of range for {len(allowed)} classes")


def find_capture(
    store_dir: str | os.PathLike[str], request_id: str, model: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The model and index entry (``shard``, ``images``, ``version``, ``task``, ...) of a
    captured request id; UnknownRequestError if none."""
    check_request_id(request_id)
    return _find_capture(Path(store_dir), request_id, model)


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


def read_feedback_record(mdir: Path, request_id: str) -> dict[str, Any] | None:
    """The feedback file of a request in a model's store directory (labels or objects), or None."""
    try:
        return json.loads(keyed_path(mdir / FEEDBACK, request_id).read_text())
    except FileNotFoundError:
        return None


def read_feedback(mdir: Path, request_id: str) -> tuple[Label, ...] | None:
    """The recorded image labels of a request in a model's store directory, or None
    (none recorded, or box feedback)."""
    record = read_feedback_record(mdir, request_id)
    if record is None or "labels" not in record:
        return None
    return tuple(record["labels"])
