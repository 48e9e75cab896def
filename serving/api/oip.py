"""The Open Inference Protocol v2 without its transport: tensors -> service layer -> tensors.

The REST adapter (:mod:`serving.api.rest.v2`) and the gRPC adapter
(:mod:`serving.api.grpc.oip`) decode their requests into an :class:`InferRequest`,
call :func:`infer`, and encode the :class:`OutputTensor` s it returns. Every model
takes one of two inputs:

- ``images``: BYTES ``[-1]``, encoded image files. They run the gateway's full
  pipeline (decode, preprocess per the model card, batching, observers); a
  classifier answers ``labels``/``scores`` ``[-1, k]`` (k from the ``top_k``
  parameter), a detector ``detection_boxes`` (original-image pixels, ymin, xmin,
  ymax, xmax), ``detection_scores``, ``detection_classes`` (label names) and
  ``num_detections``, padded to the most detections of any image.
- ``input``: FP32 ``[-1, H, W, 3]``, already preprocessed per the model card. It
  answers the signature's own outputs (``logits``/``probabilities``, or the
  detection tensors with normalised boxes and class indices).

Failures are the gateway's own errors, so both transports report them through the
error table (:mod:`serving.api.errors`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from contract.repository import is_version_name
from serving.catalog import CLASSIFICATION, DETECTION
from serving.errors import BadRequest, InvalidParameter, VersionNotFound
from serving.service import ClassifyResult, DetectResult, InferenceService, PredictOptions

SERVER_NAME = "imgserve"
PLATFORM = "tensorflow_savedmodel"
#: Protocol extensions the gateway implements (the REST binary tensor data extension).
EXTENSIONS = ("binary_tensor_data",)
IMAGES, INPUT = "images", "input"
BYTES, FP32, INT32 = "BYTES", "FP32", "INT32"
#: Numpy dtypes of the protocol's datatypes, little-endian as the protocol's raw form.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: The signature outputs the ``input`` form answers, per task (the BN probe
#: statistics are the gateway's own business).
SIGNATURE_OUTPUTS = {
    CLASSIFICATION: ("logits", "probabilities"),
    DETECTION: ("detection_boxes", "detection_scores", "detection_classes", "num_detections"),
}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class InferInput:
    """One input tensor: BYTES as a flat list of elements, other datatypes as an array."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


@dataclass(frozen=True)
class InferRequest:
    """An inference request as both transports carry it."""

    model: str
    version: str = ""
    id: str = ""
    inputs: Sequence[InferInput] = ()
    #: Names of the outputs asked for; empty: all of them.
    outputs: Sequence[str] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: The client's deadline (seconds left), when its transport carries one.
    timeout_s: float | None = None


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor; BYTES data is an object array of ``bytes``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


# -- tensor encoding -------------------------------------------------------------------
def element_count(shape: Sequence[int]) -> int:
    """How many elements a tensor of ``shape`` holds; 400 for a negative dimension.

    Exact (Python integers): a product in int64 wraps, and ``[2**40, 2**40]`` would
    claim to hold nothing, so an empty body would "fill" it.
    """
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise InvalidParameter(f"tensor shape {list(shape)} must hold non-negative integers")
    return math.prod(shape)


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """BYTES elements of a raw tensor: each a 4-byte little-endian length, then its bytes."""
    items, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise BadRequest(f"input {name!r}: BYTES data ends inside an element's length")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + size > len(raw):
            raise BadRequest(f"input {name!r}: BYTES element longer than the data left")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    return items


def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """The raw form of BYTES elements (see :func:`deserialize_bytes`)."""
    return b"".join(_LENGTH.pack(len(b)) + b for b in items)


def input_from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> InferInput:
    """An input tensor from its raw (binary) contents, checked against shape and datatype."""
    count = element_count(shape)
    if datatype == BYTES:
        items = deserialize_bytes(raw, name)
        _check_count(name, shape, len(items), count)
        return InferInput(name, datatype, tuple(shape), items)
    dtype = _dtype(name, datatype)
    if len(raw) != count * dtype.itemsize:
        raise InvalidParameter(
            f"input {name!r}: {len(raw)} bytes of {datatype} data do not fill shape {list(shape)}"
        )
    return InferInput(name, datatype, tuple(shape), np.frombuffer(raw, dtype).reshape(shape))


def input_from_values(
    name: str, datatype: str, shape: Sequence[int], values: Sequence[Any]
) -> InferInput:
    """An input tensor from a flat sequence of values (JSON data, gRPC typed contents)."""
    count = element_count(shape)
    _check_count(name, shape, len(values), count)
    if datatype == BYTES:
        if not all(isinstance(v, bytes) for v in values):
            raise InvalidParameter(f"input {name!r}: BYTES elements must be strings")
        return InferInput(name, datatype, tuple(shape), list(values))
    dtype = _dtype(name, datatype)
    try:
        array = np.asarray(values, dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError):
        raise InvalidParameter(f"input {name!r}: data are not all {datatype} values") from None
    return InferInput(name, datatype, tuple(shape), array)


def raw_contents(tensor: OutputTensor) -> bytes:
    """An output's raw (binary) form: little-endian elements, row-major."""
    if tensor.datatype == BYTES:
        return serialize_bytes(tensor.data.reshape(-1))
    return np.ascontiguousarray(tensor.data, DTYPES[tensor.datatype]).tobytes()


def _dtype(name: str, datatype: str) -> np.dtype:
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidParameter(f"input {name!r}: unknown datatype {datatype!r}")
    return dtype


def _check_count(name: str, shape: Sequence[int], got: int, expected: int) -> None:
    if got != expected:
        raise InvalidParameter(
            f"input {name!r}: shape {list(shape)} needs {expected} elements, got {got}"
        )


# -- inference ---------------------------------------------------------------------------
def infer(service: InferenceService, request: InferRequest, request_id: str) -> InferResponse:
    """Run one request through the service layer; 400/404/503 as the service decides."""
    if not request.model:
        raise BadRequest("the request names no model")
    task = service.task_of(request.model) or CLASSIFICATION
    tensor = _the_input(request.inputs)
    options = _options(request, task)
    if tensor.name == IMAGES:
        _expect(tensor, BYTES, 1, "[-1] (one encoded image file per element)")
        images = list(tensor.data)
        if task == DETECTION:
            result: Any = service.detect(images, options, request_id)
            outputs = detection_tensors(result)
        else:
            result = service.classify(images, options, request_id)
            outputs = classification_tensors(result)
    else:
        _expect(tensor, FP32, 4, "[-1, H, W, 3] (preprocessed per the model card)")
        result = service.predict_tensor(task, np.asarray(tensor.data), options, request_id)
        outputs = [
            _output(name, np.asarray(result.outputs[name]))
            for name in SIGNATURE_OUTPUTS[task]
            if name in result.outputs
        ]
    return InferResponse(
        result.model.name,
        str(result.model.version),
        request.id,
        _requested(outputs, request.outputs),
    )


def _the_input(inputs: Sequence[InferInput]) -> InferInput:
    names = [t.name for t in inputs]
    unknown = sorted(set(names) - {IMAGES, INPUT})
    if unknown:
        raise InvalidParameter(
            f"unknown input {unknown[0]!r}: give {IMAGES!r} (BYTES, encoded images) "
            f"or {INPUT!r} (FP32, preprocessed)"
        )
    if len(names) != 1:
        raise BadRequest(
            f"give exactly one input, {IMAGES!r} (BYTES, encoded images) "
            f"or {INPUT!r} (FP32, preprocessed); got {names or 'none'}"
        )
    return inputs[0]


def _expect(tensor: InferInput, datatype: str, rank: int, shape: str) -> None:
    if tensor.datatype != datatype:
        raise InvalidParameter(
            f"input {tensor.name!r} must be {datatype}, got {tensor.datatype or 'no datatype'}"
        )
    if len(tensor.shape) != rank:
        raise InvalidParameter(
            f"input {tensor.name!r} must have shape {shape}, got {list(tensor.shape)}"
        )


def _options(request: InferRequest, task: str) -> PredictOptions:
    params = request.parameters
    version = request.version.strip()
    # A version is a number, as a version directory's name is ("²" is a digit int()
    # refuses); anything else names a version label ("stable").
    number = is_version_name(version)
    return PredictOptions(
        model=request.model,
        version=int(version) if number else None,
        label=version if version and not number else None,
        top_k=_param(params, "top_k", int) if task == CLASSIFICATION else None,
        score_threshold=_param(params, "score_threshold", float),
        max_detections=_param(params, "max_detections", int) if task == DETECTION else None,
        timeout_s=request.timeout_s,
    )


def _param(params: Mapping[str, Any], name: str, typ: type) -> Any:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameter(f"parameter {name!r} must be a number, got {value!r}")
    try:
        if typ is int and not float(value).is_integer():
            raise InvalidParameter(f"parameter {name!r} must be an integer, got {value!r}")
        return typ(value)
    except OverflowError:  # an integer past float's range (JSON has no limit)
        raise InvalidParameter(f"parameter {name!r} is out of range, got {value!r}") from None


def _output(name: str, data: np.ndarray) -> OutputTensor:
    datatype = next((k for k, v in DTYPES.items() if v == data.dtype.newbyteorder("<")), None)
    if datatype is None:  # the contract's signatures output float32 only
        data, datatype = data.astype(np.float32), FP32
    return OutputTensor(name, datatype, tuple(data.shape), data)


def _requested(outputs: list[OutputTensor], names: Sequence[str]) -> list[OutputTensor]:
    if not names:
        return outputs
    by_name = {o.name: o for o in outputs}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InvalidParameter(
            f"unknown output {missing[0]!r}; this request answers {sorted(by_name)}"
        )
    return [by_name[n] for n in names]


def classification_tensors(result: ClassifyResult) -> list[OutputTensor]:
    """``labels`` (BYTES) and ``scores`` (FP32), ``[n, k]``, best first."""
    k = max((len(row) for row in result.predictions), default=0)
    n = len(result.predictions)
    labels = np.full((n, k), b"", object)
    scores = np.zeros((n, k), np.float32)
    for i, row in enumerate(result.predictions):
        for j, c in enumerate(row):
            labels[i, j], scores[i, j] = c.label.encode(), c.score
    return [
        OutputTensor("labels", BYTES, (n, k), labels),
        OutputTensor("scores", FP32, (n, k), scores),
    ]


def detection_tensors(result: DetectResult) -> list[OutputTensor]:
    """The detection tensors of the ``images`` form, padded to the most detections."""
    n = len(result.detections)
    m = max((len(image.detections) for image in result.detections), default=0)
    boxes = np.zeros((n, m, 4), np.float32)
    scores = np.zeros((n, m), np.float32)
    classes = np.full((n, m), b"", object)
    counts = np.zeros(n, np.int32)
    for i, image in enumerate(result.detections):
        counts[i] = len(image.detections)
        for j, d in enumerate(image.detections):
            boxes[i, j], scores[i, j], classes[i, j] = d.box, d.score, d.label.encode()
    return [
        OutputTensor("detection_boxes", FP32, (n, m, 4), boxes),
        OutputTensor("detection_scores", FP32, (n, m), scores),
        OutputTensor("detection_classes", BYTES, (n, m), classes),
        OutputTensor("num_detections", INT32, (n,), counts),
    ]


# -- health and metadata ---------------------------------------------------------------
def server_metadata() -> dict[str, Any]:
    """The server's name, version and protocol extensions."""
    try:
        version = metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        version = "unknown"
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def model_ready(service: InferenceService, name: str, version: str = "") -> bool:
    """Whether ``name`` (at ``version``, else its default version) can infer now; 404 if unknown."""
    model = service.describe_model(name)
    states = {str(v["version"]): v["state"] for v in model["versions"]}
    if version:
        if version not in states:
            raise VersionNotFound(f"model {name!r} has no version {version}")
        return states[version] == "AVAILABLE"
    return model["default_version"] is not None


def model_metadata(service: InferenceService, name: str, version: str = "") -> dict[str, Any]:
    """The protocol's model metadata: versions serving, platform, both inputs, the outputs."""
    model = service.describe_model(name)
    cards = {str(v["version"]): v.get("model_card") for v in model["versions"]}
    if version and version not in cards:
        raise VersionNotFound(f"model {name!r} has no version {version}")
    chosen = version or str(model["default_version"] or max(map(int, cards), default=""))
    card = cards.get(chosen) or {}
    size = card.get("input", {})
    height, width = size.get("height", -1), size.get("width", -1)
    task = model["task"] or CLASSIFICATION
    outputs = (
        [
            _meta("detection_boxes", FP32, [-1, -1, 4]),
            _meta("detection_scores", FP32, [-1, -1]),
            _meta("detection_classes", BYTES, [-1, -1]),
            _meta("num_detections", INT32, [-1]),
        ]
        if task == DETECTION
        else [
            _meta("labels", BYTES, [-1, -1]),
            _meta("scores", FP32, [-1, -1]),
            _meta("logits", FP32, [-1, len(model["class_labels"])]),
            _meta("probabilities", FP32, [-1, len(model["class_labels"])]),
        ]
    )
    return {
        "name": name,
        "versions": [str(v["version"]) for v in model["versions"] if v["state"] == "AVAILABLE"],
        "platform": PLATFORM,
        "inputs": [_meta(IMAGES, BYTES, [-1]), _meta(INPUT, FP32, [-1, height, width, 3])],
        "outputs": outputs,
    }


def _meta(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}
