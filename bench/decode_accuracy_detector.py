"""Held-out mAP of a detector on photo-sized JPEGs: full decode vs decode_oversample.

    .venv/bin/python bench/decode_accuracy_detector.py [--name demo_detector] [--held-out 250]
        [--side 4032 --side 1920]

The detector sibling of ``bench/decode_accuracy.py``. Scores an exported detector (default:
the kept demo detector, version 1) on a held-out synthetic COCO set (another seed) written
as photo-sized JPEGs: each image scaled up (bicubic) so its long side is ``--side`` px,
quality 90, boxes scaled with it. Each side is scored through the training input path
(:meth:`DetectionSample.load` with the spec, :func:`preprocess_images`) and the exported
signature, once with the full decode and once with ``decode_oversample`` 2.0; boxes go
back to original pixels by the preprocessing geometry and pycocotools scores them. The
native-size images are scored too, for reference. A report, not a gate: the classifier's
bound was 0.5 points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.tf_environment import prepare_tensorflow_environment  # noqa: E402

prepare_tensorflow_environment()  # before TensorFlow's import: no doomed cuInit on a CPU host

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from contract.model_card import load_model_card  # noqa: E402
from contract.preprocessing import PreprocessSpec  # noqa: E402
from training.detection.data import (  # noqa: E402
    ANNOTATIONS_FILE,
    IMAGES_DIR,
    DetectionDataset,
    load_coco,
    write_synthetic_coco,
)
from training.detection.evaluate import (  # noqa: E402
    DetectionMetrics,
    coco_metrics,
    detections_to_coco,
    preprocess_images,
)


def write_photo_sized(dataset: DetectionDataset, out: Path, side: int) -> Path:
    """``dataset`` re-encoded as quality-90 JPEGs whose long side is ``side``, boxes scaled."""
    (out / IMAGES_DIR).mkdir(parents=True)
    doc = dataset.to_coco()
    for entry, sample in zip(doc["images"], dataset.samples, strict=True):
        s = side / max(sample.height, sample.width)
        w, h = round(sample.width * s), round(sample.height * s)
        img = Image.fromarray(sample.load_pixels()).resize((w, h), Image.Resampling.BICUBIC)
        entry["file_name"] = Path(entry["file_name"]).with_suffix(".jpeg").name
        img.save(out / IMAGES_DIR / entry["file_name"], "JPEG", quality=90)
        sx, sy = w / sample.width, h / sample.height
        entry["width"], entry["height"] = w, h
        for ann in doc["annotations"]:
            if ann["image_id"] == sample.image_id:
                x, y, bw, bh = ann["bbox"]
                ann["bbox"] = [x * sx, y * sy, bw * sx, bh * sy]
                ann["area"] = bw * sx * bh * sy
    (out / ANNOTATIONS_FILE).write_text(json.dumps(doc))
    return out / ANNOTATIONS_FILE


def score(
    signature, dataset: DetectionDataset, spec: PreprocessSpec
) -> tuple[DetectionMetrics, float]:
    """COCO metrics of the signature on ``dataset`` decoded for ``spec``, one image at a
    time (photo-sized images are not all kept in memory); and the decode+preprocess seconds."""
    xs, geoms, seconds = [], [], 0.0
    for sample in dataset.samples:
        t = time.perf_counter()
        x, g = preprocess_images([sample.load(spec)], spec)
        seconds += time.perf_counter() - t
        xs.append(x[0])
        geoms.extend(g)
    x = np.stack(xs)
    parts = [
        {k: v.numpy() for k, v in signature(images=tf.constant(x[i : i + 50])).items()}
        for i in range(0, len(x), 50)
    ]
    outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    dets = detections_to_coco(
        [s.image_id for s in dataset.samples], outputs, geoms, dataset.category_ids
    )
    return coco_metrics(dataset.to_coco(), dets, dataset.labels), seconds


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Write the held-out JPEGs, print and return mAP per side and decode."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-base", default=str(ROOT / "models"))
    ap.add_argument("--name", default="demo_detector")
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--held-out", type=int, default=250)
    ap.add_argument("--seed", type=int, default=12345, help="seed of the held-out synthetic set")
    ap.add_argument("--side", type=int, action="append", help="long side in px (repeatable)")
    args = ap.parse_args(argv)
    sides = args.side or [4032, 1920]
    version_dir = Path(args.model_base) / args.name / str(args.version)
    card_spec = PreprocessSpec.from_dict(load_model_card(version_dir)["preprocessing"])
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="decode-accuracy-detector-") as tmp:
        native = load_coco(
            write_synthetic_coco(Path(tmp) / "native", args.held_out, seed=args.seed)
        )
        metrics, _ = score(signature, native, card_spec)
        print(
            f"{args.name}/{args.version}, {len(native)} held-out images ({native.num_boxes()} "
            f"boxes), input {card_spec.height}x{card_spec.width} {card_spec.geometry}"
        )
        print(
            f"{'native size':>36}: mAP@[.5:.95] {100 * metrics.map_50_95:.2f}  "
            f"mAP@.5 {100 * metrics.map_50:.2f}"
        )
        for side in sides:
            photos = load_coco(write_photo_sized(native, Path(tmp) / f"side{side}", side))
            row = {}
            for label, oversample in (("full decode", None), ("decode_oversample 2", 2.0)):
                spec = dataclasses.replace(card_spec, decode_oversample=oversample)
                metrics, seconds = score(signature, photos, spec)
                row[label] = 100 * metrics.map_50_95
                row[f"{label} mAP@.5"] = 100 * metrics.map_50
                print(
                    f"{f'long side {side}, {label}':>36}: mAP@[.5:.95] {row[label]:.2f}  "
                    f"mAP@.5 {row[f'{label} mAP@.5']:.2f}  "
                    f"(decode+preprocess {1000 * seconds / len(photos):.0f} ms/image)"
                )
            diff = row["decode_oversample 2"] - row["full decode"]
            diff_50 = row["decode_oversample 2 mAP@.5"] - row["full decode mAP@.5"]
            print(
                f"{f'long side {side}, difference':>36}: {diff:+.2f} points ({diff_50:+.2f} at .5)"
            )
            result[str(side)] = row
    return result


if __name__ == "__main__":
    main()
