"""LitServe: a ``LitAPI`` serving the SavedModel with LitServe's dynamic batching on.

Follows LitServe's own pattern for an image model: ``setup`` loads the model once per
worker, ``decode_request`` turns one request into one model input, ``batch`` stacks
the inputs LitServe gathered (``max_batch_size``, ``batch_timeout``), ``predict`` runs
the batch, ``unbatch``/``encode_response`` answer each request. A request is a form
upload (field ``image``, a Starlette ``UploadFile``) or JSON ``{"image": <base64>}``:
LitServe parses every body as a form or as JSON before ``decode_request``, so a raw
``image/jpeg`` body is not taken. On CPU, LitServe's docs advise a worker per core.

    python server.py --port 8000 --model-dir models/demo_classifier/1 --workers 2
"""

from __future__ import annotations

import argparse
import base64
import os

import common
import litserve as ls
import numpy as np

#: The gateway's defaults for its own dynamic batching (max batch, timeout), the same here.
MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.002


class ImageClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        model_dir = os.environ["MODEL_DIR"]
        self.card = common.read_card(model_dir)
        self.labels = list(self.card["labels"])
        self.model = common.load_signature(model_dir)

    def decode_request(self, request) -> np.ndarray:
        image = request["image"]
        data = image.file.read() if hasattr(image, "file") else base64.b64decode(image)
        return common.preprocess(data, self.card)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict:
        return common.answer(output, self.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ["MODEL_DIR"] = os.path.abspath(args.model_dir)
    api = ImageClassifierAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
