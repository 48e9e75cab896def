"""What every peer server of the peer bench shares: the model card's preprocessing done
the plain way, the answer's shape, and loading the model.

Imported inside each peer's own virtualenv (the runner puts ``bench/peers`` on
``PYTHONPATH``), so it uses the standard library, NumPy, Pillow and, where a model is
loaded, TensorFlow or Keras: never the project's packages. It reads the card as plain
JSON and repeats what the card says, as a user of each framework would write it:
decode in full (``Image.open`` -> ``ImageOps.exif_transpose`` -> ``convert("RGB")``),
resize per the card (stretch or letterbox, its filter and pad value), ``x * scale +
offset`` in float32. For a JPEG photo this is ``contract.preprocessing.preprocess_bytes``
with a full decode (no ``decode_oversample``), bit for bit; the bench's tests hold it to that.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

CARD_RELPATH = "assets.extra/model_card.json"
KERAS_RELPATH = "assets.extra/model.keras"

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


def read_card(model_dir: str | Path) -> dict[str, Any]:
    """The version's model card, as the JSON dict it is."""
    return json.loads((Path(model_dir) / CARD_RELPATH).read_text())


def decode(data: bytes, card: dict[str, Any]) -> Image.Image:
    """Image bytes -> upright RGB, decoded in full."""
    img = Image.open(io.BytesIO(data))
    if card["preprocessing"].get("exif_orientation", True):
        img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def resize(img: Image.Image, card: dict[str, Any]) -> np.ndarray:
    """RGB image -> uint8 (H, W, 3) of the model input's size, per the card's geometry."""
    pp = card["preprocessing"]
    th, tw = int(pp["height"]), int(pp["width"])
    method = _RESAMPLE[pp.get("resize_method", "bilinear")]
    if pp.get("geometry", "stretch") == "stretch":
        return np.asarray(img.resize((tw, th), method))
    w, h = img.size
    s = min(th / h, tw / w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    canvas = Image.new("RGB", (tw, th), (int(pp.get("pad_value", 0)),) * 3)
    canvas.paste(img.resize((nw, nh), method), ((tw - nw) // 2, (th - nh) // 2))
    return np.asarray(canvas)


def normalize(pixels: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    """uint8 pixels -> float32 ``x * scale + offset``."""
    pp = card["preprocessing"]
    x = np.asarray(pixels, dtype=np.float32)
    return x * np.float32(pp.get("scale", 1.0 / 127.5)) + np.float32(pp.get("offset", -1.0))


def preprocess(data: bytes, card: dict[str, Any]) -> np.ndarray:
    """Image bytes -> the model input for one image, float32 (H, W, 3)."""
    return normalize(resize(decode(data, card), card), card)


def answer(scores: np.ndarray, labels: list[str], k: int = 1) -> dict[str, Any]:
    """One image's scores -> ``{"predictions": [{"label", "score"}, ...]}``, best first."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    best = np.argsort(-scores)[:k]
    return {"predictions": [{"label": labels[i], "score": float(scores[i])} for i in best]}


def load_signature(model_dir: str | Path, output: str = "probabilities"):
    """The SavedModel's ``serving_default`` as ``f(batch float32 (N, H, W, 3)) -> (N, C)``
    NumPy scores (``output`` of the signature)."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    input_name = next(iter(signature.structured_input_signature[1]))

    def predict(batch: np.ndarray) -> np.ndarray:
        return signature(**{input_name: tf.constant(batch, dtype=tf.float32)})[output].numpy()

    return predict


def load_keras(model_dir: str | Path):
    """The Keras model the version ships beside the SavedModel (``assets.extra/model.keras``)."""
    import keras

    return keras.models.load_model(Path(model_dir) / KERAS_RELPATH, compile=False)
