"""The demo classifier as an MLServer custom inference runtime.

Written as MLServer's "Custom Inference Runtimes" guide writes one: an ``MLModel``
subclass whose ``load`` reads the artefact at the model's ``parameters.uri`` and whose
``predict`` takes a V2 (Open Inference Protocol) request. The image arrives as one
``BYTES`` element with ``content_type: base64`` and is decoded with the request codec;
adaptive batching (``max_batch_size`` / ``max_batch_time`` in ``model-settings.json``)
stacks concurrent requests along the first axis before ``predict`` sees them, and splits
the answer back per request: one ``BYTES`` output, ``predictions``, whose element for each
image is the JSON answer ``{"predictions": [{"label", "score"}]}``. Preprocessing is the
model card's, through ``common``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.codecs import Base64Codec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

# The bench puts bench/peers on PYTHONPATH; a server started by hand finds it from here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


class DemoClassifier(MLModel):
    async def load(self) -> bool:
        model_dir = await get_model_uri(self.settings)
        self._card = common.read_card(model_dir)
        self._labels = list(self._card["labels"])
        self._predict = common.load_signature(model_dir)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = self.decode(payload.inputs[0], default_codec=Base64Codec)
        batch = np.stack([common.preprocess(bytes(image), self._card) for image in images])
        answers = [json.dumps(common.answer(s, self._labels)) for s in self._predict(batch)]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[StringCodec.encode_output("predictions", answers)],
        )
