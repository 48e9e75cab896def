"""TF Serving's REST formats <-> the service layer's images and results.

Request bodies follow TF Serving's JSON API, with images as ``{"b64": ...}``
encoded files (the gateway decodes and preprocesses them per the model card):

- ``:predict`` in the row format, ``{"instances": [{"b64": ...}, ...]}`` (or each
  instance as the named input, ``{"images": {"b64": ...}}``), answered as
  ``{"predictions": [...]}``; or in the columnar format, ``{"inputs": [...]}`` (or
  ``{"inputs": {"images": [...]}}``), answered as ``{"outputs": ...}``. One output
  gives plain values, several give objects keyed by output name, as TF Serving does.
- ``:classify`` with ``{"examples": [{"image": {"b64": ...}}, ...]}``, answered as
  ``{"results": [[[label, score], ...], ...]}``: the key TF Serving's server writes
  (``json_tensor.cc``), although its REST page shows ``result``.

Both accept an optional ``signature_name``; only ``serving_default`` exists.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np

from serving.api.rest.payload import parse_json
from serving.errors import BadRequest, TooManyImages
from serving.service import ClassifyResult

DEFAULT_SIGNATURE = "serving_default"
#: The signature's one input (the contract's ``images``): a named row or column uses it.
INPUT_NAME = "images"
#: The feature holding each example's encoded image in a ``:classify`` request.
EXAMPLE_FEATURE = "image"
ROW, COLUMNAR = "row", "columnar"
_B64 = '{"b64": "<base64 image>"}'


def parse_predict(body: bytes, max_images: int) -> tuple[list[bytes], str]:
    """The images of a ``:predict`` body and its format (``ROW`` or ``COLUMNAR``)."""
    doc = _document(body, {"signature_name", "instances", "inputs"})
    if ("instances" in doc) == ("inputs" in doc):
        raise BadRequest("Missing 'inputs' or 'instances' key (give exactly one of them)")
    if "instances" in doc:
        rows = _non_empty_list(doc["instances"], "instances", max_images)
        return [_row_image(row, i) for i, row in enumerate(rows)], ROW
    columns = doc["inputs"]
    if isinstance(columns, dict) and set(columns) == {INPUT_NAME}:
        columns = columns[INPUT_NAME]
    column = _non_empty_list(columns, "inputs", max_images)
    return [_image(value, f"inputs[{i}]") for i, value in enumerate(column)], COLUMNAR


def parse_classify(body: bytes, max_images: int) -> list[bytes]:
    """The images of a ``:classify`` body, one per example."""
    doc = _document(body, {"signature_name", "examples"})
    if "examples" not in doc:
        raise BadRequest("When method is classify, key 'examples' is expected and was not found")
    examples = _non_empty_list(doc["examples"], "examples", max_images)
    images = []
    for i, example in enumerate(examples):
        if not (isinstance(example, dict) and set(example) == {EXAMPLE_FEATURE}):
            raise BadRequest(f'examples[{i}] must be {{"{EXAMPLE_FEATURE}": {_B64}}}')
        images.append(_image(example[EXAMPLE_FEATURE], f"examples[{i}].{EXAMPLE_FEATURE}"))
    return images


def predict_json(outputs: Mapping[str, np.ndarray], fmt: str) -> dict[str, Any]:
    """TF Serving's ``:predict`` answer: every output, per instance (row) or per name (columnar)."""
    names = sorted(outputs)
    arrays = {name: np.asarray(outputs[name]) for name in names}
    if fmt == COLUMNAR:
        if len(names) == 1:
            return {"outputs": arrays[names[0]].tolist()}
        return {"outputs": {name: a.tolist() for name, a in arrays.items()}}
    lists = {name: a.tolist() for name, a in arrays.items()}
    if len(names) == 1:
        return {"predictions": lists[names[0]]}
    count = len(lists[names[0]])
    return {"predictions": [{name: lists[name][i] for name in names} for i in range(count)]}


def classify_json(result: ClassifyResult) -> dict[str, Any]:
    """TF Serving's ``:classify`` answer: ``[label, score]`` pairs per example, best first."""
    return {"results": [[[c.label, c.score] for c in classes] for classes in result.predictions]}


def check_signature(body_signature: Any) -> None:
    """400 unless the request names no signature or ``serving_default`` (TF Serving's message)."""
    if body_signature is None or body_signature == "":
        return
    if not isinstance(body_signature, str):
        raise BadRequest("'signature_name' key must be a string value.")
    if body_signature != DEFAULT_SIGNATURE:
        raise BadRequest(f'Serving signature name: "{body_signature}" not found in signature def')


def _document(body: bytes, keys: set[str]) -> dict[str, Any]:
    if not body:
        raise BadRequest("JSON Parse error: The document is empty")
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise BadRequest("JSON Value is not an object")
    unknown = sorted(set(doc) - keys)
    if unknown:
        raise BadRequest(f"unknown keys {unknown}; a request has {sorted(keys)}")
    check_signature(doc.get("signature_name"))
    return doc


def _non_empty_list(value: Any, key: str, max_images: int) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"Expecting '{key}' to be a list/array of {_B64}")
    if not value:
        raise BadRequest(f"No values in '{key}' array")
    if len(value) > max_images:
        raise TooManyImages(f"{len(value)} images in one request, limit is {max_images}")
    return value


def _row_image(row: Any, i: int) -> bytes:
    # A row is the image itself, or an object naming the signature's one input.
    if isinstance(row, dict) and set(row) == {INPUT_NAME}:
        return _image(row[INPUT_NAME], f"instances[{i}].{INPUT_NAME}")
    return _image(row, f"instances[{i}]")


def _image(value: Any, where: str) -> bytes:
    if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
        raise BadRequest(f"{where} must be an encoded image, {_B64}")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: Unable to base64 decode") from None
