"""Photo-sized images as a COCO detection dataset: what a detector is trained on and
served, with boxes in each image's upright original pixels."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from contract.preprocessing import decode_image

#: Boxes as fractions of the upright image (ymin, xmin, ymax, xmax), with their classes.
FRACTIONS = np.array([[0.1, 0.2, 0.5, 0.6], [0.55, 0.05, 0.95, 0.45], [0.3, 0.7, 0.6, 0.98]])
CLASSES = np.array([0, 1, 0])


def write_photo_coco(root: Path, photos: dict[str, bytes], labels=("a", "b")) -> Path:
    """``photos`` (name -> encoded bytes) as a COCO dataset under ``root``, three boxes at
    :data:`FRACTIONS` of each upright size; returns the annotation JSON's path."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, (name, data) in enumerate(photos.items(), start=1):
        file_name = f"{name}.{Image.open(io.BytesIO(data)).format.lower()}"
        (root / "images" / file_name).write_bytes(data)
        w, h = decode_image(data).image.size  # upright, in full
        images.append({"id": i, "file_name": file_name, "width": w, "height": h})
        for (y0, x0, y1, x1), cls in zip(FRACTIONS, CLASSES, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(cls) + 1,
                    "bbox": [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h],
                }
            )
    doc = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(labels)],
    }
    (root / "annotations.json").write_text(json.dumps(doc))
    return root / "annotations.json"
