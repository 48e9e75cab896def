"""COCO evaluation of a detector with pycocotools: mAP@[.5:.95], mAP@.5, per-class AP.

Predictions are made on held-out images exactly as serving makes them: shared
preprocessing, the network, then the in-graph decode + NMS
(:mod:`training.detection.postprocess`); boxes are mapped back to original
pixels with :meth:`ImageGeometry.boxes_to_original` and scored against the
COCO ground truth. By default the network runs in inference mode (BN moving
statistics); ``training=True`` uses batch statistics instead, for the parity
check, and leaves the model unchanged.
"""

from __future__ import annotations

import contextlib
import io
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contract import bn
from contract.parity import ParityReport, paired_parity
from contract.preprocessing import ImageGeometry, PreprocessSpec, preprocess_pixels
from training.detection.boxes import iou_matrix, yxyx_to_xywh
from training.detection.data import DetectionDataset, DetectionImage

Postprocess = Callable[[list[tf.Tensor]], dict[str, tf.Tensor]]


@dataclass
class DetectionMetrics:
    """COCO box metrics on one dataset."""

    map_50_95: float
    map_50: float
    map_75: float
    per_class_ap: dict[str, float | None]  # AP@[.5:.95]; None for classes without ground truth
    images: int
    detections: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "map_50_95": self.map_50_95,
            "map_50": self.map_50,
            "map_75": self.map_75,
            "per_class_ap": dict(self.per_class_ap),
            "images": self.images,
            "detections": self.detections,
        }


def _coco_from_dict(doc: dict[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(
    ground_truth: dict[str, Any], detections: list[dict[str, Any]], labels: Sequence[str]
) -> DetectionMetrics:
    """Score COCO-format ``detections`` (``image_id``, ``category_id``, ``bbox``, ``score``).

    ``labels`` names the ground truth's categories in ascending category-id order.
    """
    from pycocotools.cocoeval import COCOeval

    gt = _coco_from_dict(ground_truth)
    cat_ids = sorted(gt.getCatIds())
    if len(cat_ids) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(cat_ids)} categories")
    n_images = len(gt.getImgIds())
    if not detections:
        # pycocotools cannot load an empty result set; nothing found scores zero.
        has_gt = {c: bool(gt.getAnnIds(catIds=[c], iscrowd=False)) for c in cat_ids}
        per_class = {
            lab: (0.0 if has_gt[c] else None) for lab, c in zip(labels, cat_ids, strict=True)
        }
        return DetectionMetrics(0.0, 0.0, 0.0, per_class, n_images, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(list(detections))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(v)) for v in ev.stats]  # -1 means "no ground truth"
    precision = ev.eval["precision"]  # [T IoUs, R recalls, K classes, A areas, M maxDets]
    per_class: dict[str, float | None] = {}
    for k, (lab, cid) in enumerate(zip(labels, cat_ids, strict=True)):
        assert ev.params.catIds[k] == cid
        p = precision[:, :, k, 0, -1]
        valid = p > -1
        per_class[lab] = float(p[valid].mean()) if valid.any() else None
    return DetectionMetrics(stats[0], stats[1], stats[2], per_class, n_images, len(detections))


def detections_to_coco(
    image_ids: Sequence[int],
    outputs: dict[str, np.ndarray],
    geometries: Sequence[ImageGeometry],
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Signature outputs (normalised model-input boxes) -> COCO results in original pixels."""
    results = []
    for i, (iid, geom) in enumerate(zip(image_ids, geometries, strict=True)):
        n = int(outputs["num_detections"][i])
        if n == 0:
            continue
        boxes = geom.boxes_to_original(outputs["detection_boxes"][i, :n])
        xywh = yxyx_to_xywh(boxes)
        for box, score, cls in zip(
            xywh,
            outputs["detection_scores"][i, :n],
            outputs["detection_classes"][i, :n],
            strict=True,
        ):
            if box[2] <= 0 or box[3] <= 0:
                continue  # entirely in the letterbox padding
            results.append(
                {
                    "image_id": int(iid),
                    "category_id": int(category_ids[int(cls)]),
                    "bbox": [round(float(v), 3) for v in box],
                    "score": float(score),
                }
            )
    return results


def preprocess_images(
    images: Sequence[DetectionImage], spec: PreprocessSpec
) -> tuple[np.ndarray, list[ImageGeometry]]:
    """Decoded images (RGB uint8, or as decoded for ``spec``) -> stacked model input and
    each image's geometry (in original pixels)."""
    xs, geoms = [], []
    for pixels in images:
        x, g = preprocess_pixels(pixels, spec)
        xs.append(x)
        geoms.append(g)
    return np.stack(xs).astype(np.float32), geoms


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_function(model: keras.Model, postprocess: Postprocess) -> Callable:
    """``images -> detections`` as one compiled graph (network in inference mode + NMS).

    Cached per model and post-processing, so repeated evaluations do not retrace.
    """
    per_model = _COMPILED.setdefault(model, {})
    if postprocess not in per_model:
        per_model[postprocess] = tf.function(
            lambda t: postprocess(list(model(t, training=False))),
            input_signature=[tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)],
        )
    return per_model[postprocess]


def predict(
    model: keras.Model,
    postprocess: Postprocess,
    x: np.ndarray,
    *,
    training: bool = False,
    batch_size: int = 32,
    shuffle_seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Run network + post-processing on preprocessed ``x``; numpy outputs stacked over batches.

    With ``training`` and a ``shuffle_seed``, the batches are drawn in a seeded random
    order (batch statistics of i.i.d. batches, as in training) and the outputs come
    back in the order of ``x``.
    """
    if training:
        order = bn.iid_order(len(x), shuffle_seed) if shuffle_seed is not None else None
        xs = x[order] if order is not None else x
        raw = bn.predict_in_mode(model, xs, training=True, batch_size=batch_size)
        batches = [postprocess([tf.convert_to_tensor(t) for t in outs]) for outs in raw]
        if order is not None:
            stacked = {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}
            out = {}
            for k, v in stacked.items():
                out[k] = np.empty_like(v)
                out[k][order] = v
            return out
    else:
        run = inference_function(model, postprocess)  # traced once per model
        batches = [
            run(tf.convert_to_tensor(x[i : i + batch_size])) for i in range(0, len(x), batch_size)
        ]
    return {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}


def evaluate_detector(
    model: keras.Model,
    postprocess: Postprocess,
    dataset: DetectionDataset,
    spec: PreprocessSpec,
    *,
    images: Sequence[DetectionImage] | None = None,
    training: bool = False,
    batch_size: int = 32,
    shuffle_seed: int | None = None,
) -> DetectionMetrics:
    """COCO metrics of ``model`` on ``dataset`` (decoded ``images`` may be passed in);
    ``shuffle_seed``: see :func:`predict`."""
    pixels = list(images) if images is not None else dataset.load_images(spec)
    x, geoms = preprocess_images(pixels, spec)
    outputs = predict(
        model, postprocess, x, training=training, batch_size=batch_size, shuffle_seed=shuffle_seed
    )
    image_ids = [s.image_id for s in dataset.samples]
    dets = detections_to_coco(image_ids, outputs, geoms, dataset.category_ids)
    return coco_metrics(dataset.to_coco(), dets, dataset.labels)


#: What the detector's parity gate pairs per image (the card's ``metrics.parity.paired_on``).
PAIRED_ON = "top detection correct at IoU 0.5 (images with ground truth)"


def top_detection_hits(
    outputs: dict[str, np.ndarray],
    dataset: DetectionDataset,
    geometries: Sequence[ImageGeometry],
    *,
    iou: float = 0.5,
) -> np.ndarray:
    """Per image: does its highest-scoring detection find an object? (``[N]`` bool)

    A hit is a top detection of the right class overlapping a non-crowd ground-truth
    box at IoU >= ``iou``; an image without detections is a miss. This is the
    per-image outcome the parity gate pairs: one yes/no per image in each BN mode,
    so the modes' disagreements are discordant pairs (McNemar), where a dataset-level
    mAP gives one number per mode and no measure of its noise. It needs no score
    threshold, so a weak but sound model (low scores, right boxes) is judged by
    where its best guess lands, and a collapsed inference mode (no boxes, or boxes
    anywhere) misses on image after image where training mode hits.
    """
    hits = np.zeros(len(dataset), bool)
    for i, (sample, geom) in enumerate(zip(dataset.samples, geometries, strict=True)):
        n = int(outputs["num_detections"][i])
        gt = sample.boxes.reshape(-1, 4)[~sample.crowd]
        if n == 0 or len(gt) == 0:
            continue
        top = int(np.argmax(outputs["detection_scores"][i, :n]))
        box = geom.boxes_to_original(outputs["detection_boxes"][i, top : top + 1])
        same_class = sample.classes[~sample.crowd] == int(outputs["detection_classes"][i, top])
        overlap = iou_matrix(box, gt)[0]
        hits[i] = bool(np.any(same_class & (overlap >= iou)))
    return hits


def detection_parity(
    model: keras.Model,
    postprocess: Postprocess,
    dataset: DetectionDataset,
    spec: PreprocessSpec,
    *,
    images: Sequence[DetectionImage],
    tolerance: float,
    batch_size: int = 32,
    shuffle_seed: int = 0,
) -> tuple[ParityReport, DetectionMetrics, DetectionMetrics]:
    """The paired parity gate on held-out images; also both modes' COCO metrics.

    Training mode reads the images in batches drawn at random (:func:`bn.iid_order`
    through :func:`predict`), as in training; the outcomes come back in image order
    and are paired per image (:func:`top_detection_hits`). Images without ground
    truth are left out of the pairs: no top detection can be right on them.
    Returns (report, inference-mode metrics, training-mode metrics).
    """
    x, geoms = preprocess_images(images, spec)
    ids = [s.image_id for s in dataset.samples]
    runs = {}
    for training in (False, True):
        out = predict(
            model,
            postprocess,
            x,
            training=training,
            batch_size=batch_size,
            shuffle_seed=shuffle_seed if training else None,
        )
        dets = detections_to_coco(ids, out, geoms, dataset.category_ids)
        metrics = coco_metrics(dataset.to_coco(), dets, dataset.labels)
        runs[training] = (top_detection_hits(out, dataset, geoms), metrics)
    has_gt = np.array([bool((~s.crowd).any()) for s in dataset.samples], bool)
    report = paired_parity(runs[False][0][has_gt], runs[True][0][has_gt], tolerance=tolerance)
    return report, runs[False][1], runs[True][1]
