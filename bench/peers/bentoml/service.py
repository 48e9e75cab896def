"""The demo classifier as a BentoML service.

Written as BentoML's "Services" and "Adaptive batching" pages write one: a
``@bentoml.service`` class that loads the model in ``__init__`` and a
``@bentoml.api(batchable=True)`` method taking ``PIL.Image`` inputs, which BentoML
reads from a multipart upload (field ``images``, one file per request) and groups across
concurrent requests up to ``max_batch_size`` (``max_latency_ms`` left at its
default, 60 s: a tighter one answers 503 to what it cannot batch in time). Served with
``bentoml serve service:Classifier``; the model version comes from ``MODEL_DIR`` and the
worker count from ``PEER_WORKERS`` (one per core, as BentoML's workers guide advises for
a CPU-bound model). Preprocessing is the model card's, through ``common``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from PIL import Image, ImageOps

# The bench puts bench/peers on PYTHONPATH; a server started by hand finds it from here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


@bentoml.service(workers=int(os.environ.get("PEER_WORKERS", "2")), traffic={"timeout": 120})
class Classifier:
    def __init__(self) -> None:
        model_dir = os.environ["MODEL_DIR"]
        self.card = common.read_card(model_dir)
        self.labels = list(self.card["labels"])
        self.predict = common.load_signature(model_dir)

    @bentoml.api(batchable=True, max_batch_size=32)
    def classify(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        batch = np.stack([self._input(image) for image in images])
        return [common.answer(scores, self.labels) for scores in self.predict(batch)]

    def _input(self, image: Image.Image) -> np.ndarray:
        """BentoML hands over an opened ``PIL.Image``; the card's decode rule
        (EXIF orientation, RGB), resize and normalisation follow from there."""
        return common.normalize(common.resize(_upright_rgb(image, self.card), self.card), self.card)


def _upright_rgb(image: Image.Image, card: dict[str, Any]) -> Image.Image:
    if card["preprocessing"].get("exif_orientation", True):
        image = ImageOps.exif_transpose(image)
    return image.convert("RGB")
