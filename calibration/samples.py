"""Reading captured samples back, joined with their feedback (what calibration consumes)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.capture_store import SHARDS, TMP_PREFIX, Label, check_model, shard_time_ns
from calibration.feedback import read_feedback_record


@dataclass(frozen=True)
class BoxLabel:
    """One labelled object of box feedback, in the captured model input.

    ``box`` is (ymin, xmin, ymax, xmax) in model-input pixels (of ``Sample.input``),
    mapped from the client's original-pixel box by the captured geometry.
    """

    label: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Sample:
    """One captured image, with its ground truth when feedback has arrived.

    ``label`` is the image label of label feedback; ``objects`` the boxes of box
    feedback (an empty tuple: the image shows no object), None without it.
    """

    model: str
    request_id: str
    index: int  # position of the image in its request
    version: int
    captured_at: float
    input: np.ndarray  # float32 model input (H, W, C)
    prediction: np.ndarray | None
    label: Label | None
    raw: bytes | None
    objects: tuple[BoxLabel, ...] | None = None


@dataclass
class SampleSet:
    """Captured images as arrays (what calibration consumes).

    ``labels`` and ``labelled`` are image-label feedback; ``objects`` and
    ``box_labelled`` box feedback (boxes in model-input pixels).
    """

    inputs: np.ndarray  # [n, H, W, C] float32
    labels: list[Label | None]
    request_ids: list[str]
    versions: np.ndarray  # [n] int
    captured_at: np.ndarray  # [n] float64
    predictions: list[np.ndarray | None]
    skipped: dict[str, int]
    objects: list[tuple[BoxLabel, ...] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of the images that have ground truth."""
        return np.array([lab is not None for lab in self.labels], dtype=bool)

    @property
    def box_labelled(self) -> np.ndarray:
        """Boolean mask of the images that have box feedback."""
        objects = self.objects or [None] * len(self)
        return np.array([objs is not None for objs in objects], dtype=bool)


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

    ``labelled=True`` yields only images with feedback (image labels or boxes),
    ``False`` only those without, None all. ``since`` (unix seconds) skips older captures. A shard
    that vanishes (evicted while reading) or cannot be parsed is skipped and
    counted in ``skipped``.
    """
    mdir = Path(store_dir) / check_model(model)
    sdir = mdir / SHARDS
    if not sdir.is_dir():
        return
    names = sorted(
        (n for n in os.listdir(sdir) if n.endswith(".npz") and not n.startswith(TMP_PREFIX)),
        reverse=newest_first,
    )
    skipped = skipped if skipped is not None else {}
    for name in names:
        if since is not None and shard_time_ns(name) < since * 1e9:
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
        record = read_feedback_record(mdir, request_id)
        if labelled is True and record is None or labelled is False and record is not None:
            continue
        labels = None if record is None else record.get("labels")
        boxes = None if record is None else record.get("objects")
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
                objects=None if boxes is None or i >= len(boxes) else _box_labels(boxes[i]),
            )


def _box_labels(objs: list[dict]) -> tuple[BoxLabel, ...]:
    return tuple(
        BoxLabel(str(o["label"]), tuple(float(v) for v in o["input_box"]))  # type: ignore[arg-type]
        for o in objs
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
        objects=[s.objects for s in picked],
    )
