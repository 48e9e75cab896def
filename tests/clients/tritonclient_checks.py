"""Talk to the gateway as a user of tritonclient does, and print what came back as JSON.

Runs in the client virtualenv (``.venv-clients``, from ``tests/clients/requirements.lock``),
never in the product's: tritonclient needs protobuf < 7. Usage::

    python tests/clients/tritonclient_checks.py http|grpc HOST:PORT FILES_DIR

``FILES_DIR`` holds the images to send (``*.jpg``, ``*.png``, sent in name order) and
``input.npy``, a batch already preprocessed for ``tiny_classifier``. The report has one
entry per check; the tests compare it with the gateway's own API.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

CLASSIFIER, DETECTOR = "tiny_classifier", "tiny_detector"


def client_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def as_list(array: np.ndarray) -> list:
    """JSON-ready values: BYTES elements decoded as text."""
    if array.dtype == object:
        return (
            [[v.decode() for v in row] for row in array]
            if array.ndim == 2
            else [v.decode() for v in array.reshape(-1)]
        )
    return array.tolist()


def infer(tc, client, model: str, inputs, outputs: list[str], parameters=None) -> dict:
    requested = [tc.InferRequestedOutput(name) for name in outputs]
    result = client.infer(model, inputs, outputs=requested, parameters=parameters)
    return {name: as_list(result.as_numpy(name)) for name in outputs}


def main(protocol: str, url: str, files: Path) -> dict:
    tc = client_module(protocol)
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url=url)
    paths = sorted(p for p in files.iterdir() if p.suffix in (".jpg", ".png"))
    encoded = np.array([p.read_bytes() for p in paths], dtype=object)
    images = tc.InferInput("images", [len(paths)], "BYTES")
    images.set_data_from_numpy(encoded)
    report: dict = {
        "files": [p.name for p in paths],
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(CLASSIFIER),
        "version_ready": client.is_model_ready(DETECTOR, "1"),
    }
    meta = client.get_model_metadata(CLASSIFIER)
    if protocol == "grpc":  # a protobuf message: the same fields as the REST document
        meta = {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                for t in meta.inputs
            ],
        }
    report["metadata"] = {k: meta[k] for k in ("name", "versions", "platform", "inputs")}
    report["classify"] = infer(
        tc, client, CLASSIFIER, [images], ["labels", "scores"], parameters={"top_k": 2}
    )
    report["detect"] = infer(
        tc,
        client,
        DETECTOR,
        [images],
        ["detection_boxes", "detection_scores", "detection_classes", "num_detections"],
    )
    batch = np.load(files / "input.npy")
    tensor = tc.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    report["tensor"] = infer(tc, client, CLASSIFIER, [tensor], ["probabilities"])
    try:
        client.infer("no_such_model", [images])
        report["unknown_model"] = None
    except InferenceServerException as exc:
        report["unknown_model"] = exc.message()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
