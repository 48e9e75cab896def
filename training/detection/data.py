"""Detection datasets: a COCO-format loader and a synthetic COCO-format generator.

COCO format is what users have: an annotation JSON (``images``, ``annotations``
with ``bbox = [x, y, width, height]`` in pixels, ``categories``) and a folder of
images. :func:`load_coco` reads it into a :class:`DetectionDataset`; pixels are
decoded on demand by :func:`contract.preprocessing.decode_image` (the project's
only decoder), so every format, EXIF rotation and colour rule is the same as in
serving. Given the model's :class:`~contract.preprocessing.PreprocessSpec`, the
decode is the gateway's own (``decode_image(spec=...)``): a photo-sized JPEG may
come back drafted (smaller than its annotations), as a
:class:`~contract.preprocessing.DecodedImage` whose ``size`` is still the full
upright size the boxes are in.

:func:`write_synthetic_coco` writes the built-in synthetic set *in COCO format*,
so the same loader reads it: 2-6 shapes per image (the shapes of
:mod:`training.synthetic`, turned up to 15 degrees), small (about 12 px) to large
(90 px), each earlier one up to 35% occluded by later ones, in colours that
contrast with the background beneath them, on varied backgrounds with clutter
(lines and dots that are no class) and noise. Boxes are the exact pixel extent of each whole
shape (occluded parts included, as a person would draw them). The same seed
always writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from contract.preprocessing import DecodedImage, ImageError, PreprocessSpec, decode_image
from training.detection.boxes import xywh_to_yxyx, yxyx_to_xywh
from training.synthetic import TRAINING_BACKGROUNDS, background_pixels, distinct_colour, draw_shape

#: Classes of the synthetic detection set (shapes of :mod:`training.synthetic`).
SYNTHETIC_CLASSES = ("circle", "square", "triangle", "cross")
ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"


#: A decoded dataset image: full-size RGB uint8 pixels (decoded without a spec), or the
#: :class:`DecodedImage` decoded for a model input (possibly drafted; boxes refer to its
#: ``size``). Everything that preprocesses images takes either.
DetectionImage = np.ndarray | DecodedImage


class DatasetError(ValueError):
    """A dataset that cannot be used as given (bad JSON, missing images, no boxes)."""


@dataclass
class DetectionSample:
    """One image and its boxes (original pixels, ``(ymin, xmin, ymax, xmax)``)."""

    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray  # [N, 4] float32, pixels
    classes: np.ndarray  # [N] int64, 0-based label index
    crowd: np.ndarray  # [N] bool: COCO crowd regions (evaluated as "ignore", not trained on)

    def load_pixels(self) -> np.ndarray:
        """Decode the image file in full to RGB uint8 (``DatasetError`` if it cannot be)."""
        return self.decode().pixels

    def decode(self, spec: PreprocessSpec | None = None) -> DecodedImage:
        """Decode the image file, for ``spec``'s model input when given (as the gateway
        does: photo-sized decoding when the spec sets it), else in full.

        Raises ``DatasetError`` if it cannot be decoded or its full upright size is not
        the annotated one (the boxes would not fit it).
        """
        try:
            decoded = decode_image(self.path.read_bytes(), spec=spec)
        except (OSError, ImageError) as exc:
            raise DatasetError(f"image {self.path} cannot be used: {exc}") from exc
        w, h = decoded.size
        if (h, w) != (self.height, self.width):
            raise DatasetError(
                f"image {self.path} is {w}x{h} but the annotations say {self.width}x{self.height}"
            )
        return decoded

    def load(self, spec: PreprocessSpec | None = None) -> DetectionImage:
        """The image as training keeps it: decoded for ``spec`` (a :class:`DecodedImage`),
        or without one the full-size pixels."""
        return self.decode(spec) if spec is not None else self.load_pixels()


@dataclass
class DetectionDataset:
    """Samples, label names, and the COCO category id behind each label index."""

    labels: list[str]
    category_ids: list[int]
    samples: list[DetectionSample]
    source: str = ""
    fingerprint: str = ""
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int]) -> DetectionDataset:
        """The same dataset restricted to ``indices`` (labels unchanged)."""
        return DetectionDataset(
            self.labels,
            self.category_ids,
            [self.samples[int(i)] for i in indices],
            self.source,
            self.fingerprint,
            list(self.skipped),
        )

    def load_images(self, spec: PreprocessSpec | None = None) -> list[DetectionImage]:
        """Every image decoded (:meth:`DetectionSample.load`: for ``spec`` when given, else
        RGB uint8 at native size); ``DatasetError`` on a bad one."""
        return [s.load(spec) for s in self.samples]

    def decode_usable(
        self, spec: PreprocessSpec | None = None
    ) -> tuple[DetectionDataset, list[DetectionImage]]:
        """Decode every image (as :meth:`load_images`); ones that cannot be used are dropped
        and listed in ``skipped``."""
        kept, pixels, skipped = [], [], list(self.skipped)
        for s in self.samples:
            try:
                pixels.append(s.load(spec))
                kept.append(s)
            except DatasetError as exc:
                skipped.append(str(exc))
        if not kept:
            raise DatasetError(f"no usable images in {self.source}")
        out = DetectionDataset(
            self.labels, self.category_ids, kept, self.source, self.fingerprint, skipped
        )
        return out, pixels

    def num_boxes(self) -> int:
        return int(sum(int((~s.crowd).sum()) for s in self.samples))

    def to_coco(self) -> dict[str, Any]:
        """A COCO ground-truth dict of these samples (for pycocotools)."""
        images, annotations = [], []
        ann_id = 1
        for s in self.samples:
            images.append(
                {"id": s.image_id, "file_name": s.path.name, "height": s.height, "width": s.width}
            )
            for box, cls, crowd in zip(
                yxyx_to_xywh(s.boxes.reshape(-1, 4)), s.classes, s.crowd, strict=True
            ):
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": s.image_id,
                        "category_id": self.category_ids[int(cls)],
                        "bbox": [float(v) for v in box],
                        "area": float(box[2] * box[3]),
                        "iscrowd": int(crowd),
                    }
                )
                ann_id += 1
        categories = [
            {"id": cid, "name": name}
            for cid, name in zip(self.category_ids, self.labels, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


def _require(obj: dict, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetError(f"{where} lacks the required key {key!r}")
    return obj[key]


def load_coco(
    annotations: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None = None
) -> DetectionDataset:
    """Read a COCO-format detection dataset.

    ``images_dir`` defaults to an ``images`` folder beside the JSON if there is
    one, else the JSON's folder. Labels are the category names in ascending
    category-id order. Boxes with zero width or height are skipped (listed in
    ``skipped``); an image without boxes is kept (it teaches background). Raises
    :class:`DatasetError` for unreadable JSON, missing keys, unknown image or
    category ids, missing image files, or a dataset with no boxes at all.
    """
    ann_path = Path(annotations)
    try:
        raw = ann_path.read_bytes()
        doc = json.loads(raw)
    except FileNotFoundError as exc:
        raise DatasetError(f"no annotation file at {ann_path}") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{ann_path} is not a readable JSON file: {exc}") from exc
    if images_dir is None:
        beside = ann_path.parent / IMAGES_DIR
        images_dir = beside if beside.is_dir() else ann_path.parent
    root = Path(images_dir)
    if not root.is_dir():
        raise DatasetError(f"images folder {root} does not exist")

    cats = _require(doc, "categories", str(ann_path))
    if not isinstance(cats, list) or not cats:
        raise DatasetError(f"{ann_path} has no categories")
    by_id: dict[int, str] = {}
    for c in cats:
        cid = int(_require(c, "id", "a category"))
        if cid in by_id:
            raise DatasetError(f"category id {cid} appears twice")
        by_id[cid] = str(_require(c, "name", f"category {cid}"))
    category_ids = sorted(by_id)
    index_of = {cid: i for i, cid in enumerate(category_ids)}

    images = _require(doc, "images", str(ann_path))
    if not isinstance(images, list) or not images:
        raise DatasetError(f"{ann_path} lists no images")
    per_image: dict[int, list[tuple[list[float], int, bool]]] = {}
    meta: dict[int, dict] = {}
    for img in images:
        iid = int(_require(img, "id", "an image"))
        if iid in meta:
            raise DatasetError(f"image id {iid} appears twice")
        meta[iid] = img
        per_image[iid] = []

    skipped: list[str] = []
    for ann in _require(doc, "annotations", str(ann_path)):
        iid = int(_require(ann, "image_id", "an annotation"))
        cid = int(_require(ann, "category_id", "an annotation"))
        bbox = _require(ann, "bbox", "an annotation")
        if iid not in per_image:
            raise DatasetError(f"annotation {ann.get('id')} refers to unknown image {iid}")
        if cid not in index_of:
            raise DatasetError(f"annotation {ann.get('id')} refers to unknown category {cid}")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4:
            raise DatasetError(f"annotation {ann.get('id')} has a malformed bbox {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            skipped.append(f"annotation {ann.get('id')}: empty or invalid bbox {bbox}")
            continue
        per_image[iid].append(([x, y, w, h], index_of[cid], bool(ann.get("iscrowd", 0))))

    samples = []
    for iid, img in meta.items():
        name = str(_require(img, "file_name", f"image {iid}"))
        path = root / name
        if not path.is_file():
            raise DatasetError(f"image file {path} (image id {iid}) does not exist")
        anns = per_image[iid]
        boxes = xywh_to_yxyx(np.array([a[0] for a in anns], np.float64).reshape(-1, 4))
        samples.append(
            DetectionSample(
                image_id=iid,
                path=path,
                height=int(_require(img, "height", f"image {iid}")),
                width=int(_require(img, "width", f"image {iid}")),
                boxes=boxes.astype(np.float32),
                classes=np.array([a[1] for a in anns], np.int64),
                crowd=np.array([a[2] for a in anns], bool),
            )
        )
    dataset = DetectionDataset(
        labels=[by_id[c] for c in category_ids],
        category_ids=category_ids,
        samples=samples,
        source=str(ann_path),
        fingerprint=hashlib.sha256(raw).hexdigest()[:16],
        skipped=skipped,
    )
    if dataset.num_boxes() == 0:
        raise DatasetError(f"{ann_path} has no usable boxes")
    return dataset


# -- synthetic set -----------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """How the synthetic detection images are drawn."""

    classes: tuple[str, ...] = SYNTHETIC_CLASSES
    min_side: int = 112  # native image sides are drawn from [min_side, max_side]
    max_side: int = 144
    min_objects: int = 2
    max_objects: int = 6
    # Shape radius as a fraction of the shorter side, log-uniform: small to large.
    min_radius: float = 0.06
    max_radius: float = 0.3
    # An earlier shape's box may be covered by at most this fraction by later ones.
    max_occlusion: float = 0.35
    # Shapes are turned by up to this many degrees either way: upright-ish, as
    # objects in photographs mostly are.
    max_rotation: float = 15.0
    max_clutter: int = 6
    max_noise: float = 10.0
    backgrounds: tuple[str, ...] = TRAINING_BACKGROUNDS

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("need at least one class")
        if not 16 <= self.min_side <= self.max_side:
            raise ValueError("need 16 <= min_side <= max_side")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not 0 < self.min_radius <= self.max_radius < 0.5:
            raise ValueError("need 0 < min_radius <= max_radius < 0.5")
        if not self.backgrounds:
            raise ValueError("need at least one background kind")


def _shape_box(cls: str, cx: float, cy: float, r: float, angle: float, w: int, h: int):
    """The exact pixel extent of a shape, from a mask drawn by the same routine."""
    mask = Image.new("L", (w, h), 0)
    draw_shape(ImageDraw.Draw(mask), cls, cx, cy, r, angle, 255, 0)
    return mask.getbbox()  # (x0, y0, x1, y1), x1/y1 exclusive; None if nothing drawn


def render_synthetic(
    rng: np.random.Generator, config: SyntheticConfig = SyntheticConfig()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: RGB uint8, ``[N, 4]`` pixel boxes (ymin, xmin, ymax, xmax), ``[N]`` classes."""
    w = int(rng.integers(config.min_side, config.max_side + 1))
    h = int(rng.integers(config.min_side, config.max_side + 1))
    kind = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    bg = background_pixels(rng, kind, w, h)
    bg_mean = bg.reshape(-1, 3).mean(0)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # Clutter that is no class: thin lines and dots smaller than any shape.
    for _ in range(int(rng.integers(0, config.max_clutter + 1))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, [w, h, w, h]))
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
        else:
            cx, cy, rad = (
                float(rng.uniform(0, w)),
                float(rng.uniform(0, h)),
                float(rng.uniform(1, 2.5)),
            )
            draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=colour)

    short = min(w, h)
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    placed: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1
    covered: list[float] = []  # fraction of each placed box already occluded (upper bound)
    classes: list[int] = []
    for _ in range(wanted * 20):
        if len(placed) == wanted:
            break
        cls = int(rng.integers(len(config.classes)))
        r = short * math.exp(rng.uniform(math.log(config.min_radius), math.log(config.max_radius)))
        cx = float(rng.uniform(r, w - r))
        cy = float(rng.uniform(r, h - r))
        angle = math.radians(float(rng.uniform(-config.max_rotation, config.max_rotation)))
        box = _shape_box(config.classes[cls], cx, cy, r, angle, w, h)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        # Later shapes lie on top: each earlier one may lose at most max_occlusion of its box.
        extra = []
        for px0, py0, px1, py1 in placed:
            iw = max(0.0, min(x1, px1) - max(x0, px0))
            ih = max(0.0, min(y1, py1) - max(y0, py0))
            extra.append(iw * ih / ((px1 - px0) * (py1 - py0)))
        if any(c + e > config.max_occlusion for c, e in zip(covered, extra, strict=True)):
            continue
        covered = [c + e for c, e in zip(covered, extra, strict=True)]
        # Contrast against the background under the shape, not the image average:
        # on gradients and blotches the two differ, and an invisible shape is a wrong label.
        colour = distinct_colour(rng, bg[y0:y1, x0:x1].reshape(-1, 3).mean(0))
        draw_shape(
            draw, config.classes[cls], cx, cy, r, angle, colour, tuple(int(v) for v in bg_mean)
        )
        placed.append((x0, y0, x1, y1))
        covered.append(0.0)
        classes.append(cls)

    out = np.asarray(img, dtype=np.float64)
    out += rng.normal(0, float(rng.uniform(0, config.max_noise)), out.shape)
    pixels = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    boxes = np.array([[y0, x0, y1, x1] for x0, y0, x1, y1 in placed], np.float32).reshape(-1, 4)
    return pixels, boxes, np.array(classes, np.int64)


def write_synthetic_coco(
    out_dir: str | os.PathLike[str],
    num_images: int,
    *,
    seed: int = 0,
    config: SyntheticConfig = SyntheticConfig(),
) -> Path:
    """Write ``num_images`` synthetic images as a COCO dataset; returns the JSON path.

    Layout: ``out_dir/annotations.json`` and ``out_dir/images/NNNNNN.png``.
    """
    if num_images < 1:
        raise ValueError("num_images must be >= 1")
    root = Path(out_dir)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        pixels, boxes, classes = render_synthetic(rng, config)
        name = f"{i + 1:06d}.png"
        Image.fromarray(pixels).save(root / IMAGES_DIR / name)
        h, w = pixels.shape[:2]
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for box, cls in zip(yxyx_to_xywh(boxes), classes, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(cls) + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    doc = {
        "info": {"description": "synthetic shapes", "seed": seed, "images": num_images},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(config.classes)],
    }
    path = root / ANNOTATIONS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return path
