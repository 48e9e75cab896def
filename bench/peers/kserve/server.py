"""The demo classifier behind KServe's Python model server.

Written as KServe's "custom Python serving runtime" page writes one: a ``kserve.Model``
subclass that loads in ``load``, turns the V1 request's ``{"b64": ...}`` instances into a
batch in ``preprocess`` (Pillow decode, the model card's resize and normalisation, through
``common``), runs the SavedModel in ``predict``, and is started with
``ModelServer().start([model])`` and the server's own command-line arguments
(``--http_port``, ``--workers``, ``--model_name``). KServe batches nothing itself: one
request is one image.
"""

from __future__ import annotations

import argparse
import base64
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from kserve import Model, ModelServer, model_server
from kserve.errors import InvalidInput

# The bench puts bench/peers on PYTHONPATH; a server started by hand finds it from here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


class DemoClassifier(Model):
    def __init__(self, name: str, model_dir: str):
        super().__init__(name)
        self.model_dir = model_dir
        self._predict = None
        self._lock = threading.Lock()
        self.load()

    def load(self) -> bool:
        with self._lock:
            if self._predict is None:
                self._card = common.read_card(self.model_dir)
                self._labels = list(self._card["labels"])
                self._predict = common.load_signature(self.model_dir)
            self.ready = True
        return self.ready

    # With ``--workers`` above 1, ModelServer spawns its uvicorn workers and pickles the
    # registered models into them; a worker that does not answer its parent's ping within
    # 5 s is replaced, so each loads its own copy of the SavedModel in the background and
    # reports ready when done (a request that comes first waits in ``load``, which
    # KServe's data plane calls for a model that is not ready).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_predict=None, _lock=None, ready=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        threading.Thread(target=self.load, daemon=True).start()

    def preprocess(self, payload: dict[str, Any], headers: dict[str, str] | None = None):
        try:
            instances = payload["instances"]
            images = [base64.b64decode(_b64(instance)) for instance in instances]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(
                f'expected {{"instances": [{{"image_bytes": {{"b64": ...}}}}]}}: {exc}'
            ) from exc
        return np.stack([common.preprocess(image, self._card) for image in images])

    def predict(self, batch: np.ndarray, headers: dict[str, str] | None = None) -> dict[str, Any]:
        answers = [common.answer(s, self._labels) for s in self._predict(batch)]
        return {"predictions": [a["predictions"] for a in answers]}


def _b64(instance: dict[str, Any]) -> str:
    """The base64 text of one V1 instance: ``{"image_bytes": {"b64": ...}}`` as TF Serving
    names it, or ``{"image": {"b64": ...}}`` as KServe's custom-model example does."""
    for key in ("image_bytes", "image"):
        if key in instance:
            return instance[key]["b64"]
    return instance["b64"]


parser = argparse.ArgumentParser(parents=[model_server.parser])
parser.add_argument("--model_dir", required=True, help="the SavedModel version directory")

if __name__ == "__main__":
    args, _ = parser.parse_known_args()
    ModelServer().start([DemoClassifier(args.model_name, args.model_dir)])
