"""Shared fixtures: real test images in every mode/format, and tiny trained models.

Images come from scikit-image's bundled photographs, re-encoded with Pillow into
each mode and container the service must accept. Models are trained by the real
training code at a tiny size, once per test session.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(name: str = "chelsea.png") -> Image.Image:
    """A bundled scikit-image photograph as a Pillow image."""
    return Image.open(SKIMAGE_DATA / name)


def exif_rotated_jpeg(orientation: int = 6) -> tuple[bytes, np.ndarray]:
    """A JPEG stored sideways with an EXIF orientation tag, and the upright pixels.

    Orientation 6 means "rotate 90° clockwise to display": the stored pixels
    are the upright image rotated 90° counter-clockwise.
    """
    upright = photo("chelsea.png").convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "JPEG", quality=95, exif=exif)
    # The reference is what the decoder should produce: the stored JPEG, turned upright.
    decoded = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    return data, np.asarray(decoded)


def sample_image_bytes() -> dict[str, bytes]:
    """Encoded images, one per mode/format the decoder must handle."""
    rgb = photo("chelsea.png").convert("RGB")
    grey = photo("camera.png").convert("L")
    rgba = rgb.copy()
    alpha = Image.linear_gradient("L").resize(rgb.size)
    rgba.putalpha(alpha)
    palette = rgb.quantize(64)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 0
    grey16 = Image.fromarray((np.asarray(grey, np.uint16) * 257).astype(np.uint16))
    frames = [rgb.resize((64, 48)), rgb.rotate(90).resize((64, 48))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "jpeg": _encode(rgb, "JPEG", quality=90),
        "png": _encode(rgb, "PNG"),
        "grey_png": _encode(grey, "PNG"),
        "rgba_png": _encode(rgba, "PNG"),
        "palette_png": _encode(palette, "PNG"),
        "palette_transparent_png": _encode(palette_t, "PNG", transparency=0),
        "grey16_png": _encode(grey16, "PNG"),
        "cmyk_jpeg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "exif_rotated_jpeg": exif_rotated_jpeg()[0],
        "gif_animated": gif.getvalue(),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_multipage": (SKIMAGE_DATA / "multipage.tif").read_bytes(),
        "webp": _encode(rgb, "WEBP", quality=90),
    }


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    return sample_image_bytes()


def computed_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, compute: Callable[[Path], dict]
) -> tuple[Path, dict]:
    """``compute(directory)`` once per test run: a directory of results and a JSON summary.

    Under pytest-xdist (``make test`` runs two workers) every worker process has its own
    session; the first to ask computes under an exclusive lock in the run's shared
    temporary directory, and the others wait for it and read what it wrote. Without
    xdist it is a plain session fixture body. The results are shared: never mutate them.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        directory = tmp_path_factory.mktemp(name)
        return directory, json.loads(_to_json(compute(directory)))
    shared = tmp_path_factory.getbasetemp().parent
    directory, done = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if done.exists():
            return directory, json.loads(done.read_text())
        shutil.rmtree(directory, ignore_errors=True)  # a failed attempt's leftovers
        directory.mkdir()
        text = _to_json(compute(directory))
        done.write_text(text)
        return directory, json.loads(text)


def _to_json(summary: dict) -> str:
    """JSON of a run's summary: numpy scalars as numbers, paths as strings."""
    return json.dumps(summary, default=lambda v: v.item() if hasattr(v, "item") else str(v))


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory) -> tuple[Path, dict]:
    """The session's one default training: the ``tiny`` preset on :func:`write_photo_crops`
    (100 per class, seed 0), exported as ``tiny_classifier`` version 1 (label stable).

    Returns (model base, the training summary without the Keras model). Tests that
    need a default run of the package's BN policy read this one instead of training
    their own: a MobileNetV2 training costs about a minute here, mostly graph tracing.
    """
    from training.classifier import PRESETS, ClassifierConfig, train_classifier

    def train(directory: Path) -> dict:
        base = directory / "models"
        data = write_photo_crops(directory / "photo_crops", 100)
        cfg = ClassifierConfig(
            **{**PRESETS["tiny"], "data": str(data), "model_base": str(base)},
            name="tiny_classifier",
        )
        summary = train_classifier(cfg)
        return {k: v for k, v in summary.items() if k != "model"}

    directory, summary = computed_once(tmp_path_factory, "tiny_training", train)
    return directory / "models", summary


@pytest.fixture(scope="session")
def model_repo(tiny_training) -> Path:
    """A model base with ``tiny_classifier`` version 1 (label stable), really trained."""
    return tiny_training[0]


PHOTO_CLASSES = ("astronaut.png", "coffee.png", "chelsea.png")


def write_photo_crops(root: Path, per_class: int, *, seed: int = 0, size: int = 40) -> Path:
    """A small real-image class-folder dataset: random crops of three photographs.

    Classes are separable from colour and texture, so a MobileNetV2 learns them
    from scratch in a few epochs, which keeps training tests fast.
    """
    rng = np.random.default_rng(seed)
    for name in PHOTO_CLASSES:
        img = np.asarray(photo(name).convert("RGB"))
        d = root / name.split(".")[0]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            s = int(rng.integers(size, 3 * size))
            y, x = rng.integers(0, img.shape[0] - s), rng.integers(0, img.shape[1] - s)
            crop = Image.fromarray(img[y : y + s, x : x + s])
            crop.save(d / f"{i:04d}.png")
    return root
