"""The Open Inference Protocol v2 over REST: ``/v2/...`` -> :mod:`serving.api.oip` -> JSON.

Requests are JSON, or JSON followed by binary tensor data (the binary tensor data
extension: the ``Inference-Header-Content-Length`` header gives the JSON part's
length, an input's ``binary_data_size`` parameter its share of the rest). In
plain JSON a BYTES element is a string; with the input parameter
``"content_type": "base64"`` it is base64 (how image files travel in JSON).
Outputs are binary when the request asks (``binary_data`` per output, or
``binary_data_output`` for all), JSON otherwise.

Errors are ``{"error": "<detail>"}`` with the error table's status (400 bad input,
404 unknown model or version, 503 not ready or overloaded...). The health routes
and ``GET /v2`` are probes and not counted in the request metrics (``oip_health``).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, g, json, jsonify, request

from serving.api import errors, oip
from serving.api.rest.inference import service
from serving.api.rest.payload import parse_json, read_body, request_timeout
from serving.errors import BadRequest, InvalidParameter, ServingError

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"

health_bp = Blueprint("oip_health", __name__)
bp = Blueprint("oip", __name__)


@health_bp.get("/v2")
def server_metadata():
    return jsonify(oip.server_metadata())


@health_bp.get("/v2/health/live")
def server_live():
    return jsonify({"live": True})


@health_bp.get("/v2/health/ready")
def server_ready():
    ready = service().readiness()[0]
    return jsonify({"ready": ready}), 200 if ready else 503


@bp.get("/v2/models/<name>")
@bp.get("/v2/models/<name>/versions/<version>")
def model_metadata(name: str, version: str = ""):
    svc = service()
    g.metric_model = svc.known_model(name)
    return jsonify(oip.model_metadata(svc, name, version))


@bp.get("/v2/models/<name>/ready")
@bp.get("/v2/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str = ""):
    svc = service()
    g.metric_model = svc.known_model(name)
    ready = oip.model_ready(svc, name, version)
    return jsonify({"name": name, "ready": ready}), 200 if ready else 503


@bp.post("/v2/models/<name>/infer")
@bp.post("/v2/models/<name>/versions/<version>/infer")
def model_infer(name: str, version: str = ""):
    svc = service()
    g.metric_model = svc.known_model(name)
    req, binary = infer_request(name, version)
    return infer_response(oip.infer(svc, req, g.request_id), binary)


# -- request ---------------------------------------------------------------------------
def infer_request(name: str, version: str) -> tuple[oip.InferRequest, dict[str, bool]]:
    """The request, and which outputs were asked for in binary (``""``: the default)."""
    body = read_body(request)
    json_part, binary = body, b""
    length = request.headers.get(HEADER_LENGTH)
    if length is not None:
        if not (length.isascii() and length.isdigit()) or int(length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} {length!r} does not fit a {len(body)}-byte body")
        json_part, binary = body[: int(length)], body[int(length) :]
    if not json_part:
        raise BadRequest("empty request body")
    doc = parse_json(json_part)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadRequest('the body must be an object with "inputs": [...]')
    params = _object(doc.get("parameters"), "parameters")
    inputs, offset = [], 0
    for i, item in enumerate(doc["inputs"]):
        tensor, used = _input(_object(item, f"inputs[{i}]"), i, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs = [_object(o, f"outputs[{i}]") for i, o in enumerate(doc.get("outputs") or [])]
    names = [_string(o.get("name"), "output name") for o in outputs]
    binary_all = params.get("binary_data_output") is True
    asked = {
        n: _object(o.get("parameters"), "output parameters")
        for n, o in zip(names, outputs, strict=True)
    }
    binary_out = {n: p.get("binary_data", binary_all) is True for n, p in asked.items()}
    binary_out[""] = binary_all
    req = oip.InferRequest(
        model=name,
        version=version,
        id=str(doc.get("id") or ""),
        inputs=inputs,
        outputs=names,
        parameters=params,
        timeout_s=request_timeout(request),
    )
    return req, binary_out


def _input(item: Mapping[str, Any], i: int, binary: bytes) -> tuple[oip.InferInput, int]:
    name = _string(item.get("name"), f"inputs[{i}].name")
    datatype = _string(item.get("datatype"), f"input {name!r} datatype")
    shape = item.get("shape")
    if not isinstance(shape, list):
        raise InvalidParameter(f"input {name!r} needs a shape (a list of integers)")
    params = _object(item.get("parameters"), f"input {name!r} parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {size!r} exceeds the binary data")
        return oip.input_from_raw(name, datatype, _shape(shape, name), binary[:size]), size
    if "data" not in item:
        raise BadRequest(f"input {name!r} has neither data nor binary_data_size")
    values = _flatten(item["data"])
    if datatype == oip.BYTES:
        values = _bytes_elements(name, values, params.get("content_type"))
    return oip.input_from_values(name, datatype, _shape(shape, name), values), 0


def _bytes_elements(name: str, values: list[Any], content_type: Any) -> list[bytes]:
    if not all(isinstance(v, str) for v in values):
        raise InvalidParameter(f"input {name!r}: BYTES elements must be strings in JSON")
    if content_type == "base64":
        try:
            return [base64.b64decode(v, validate=True) for v in values]
        except (binascii.Error, ValueError):
            raise BadRequest(f"input {name!r}: an element is not valid base64") from None
    if content_type not in (None, "str"):
        raise InvalidParameter(f"input {name!r}: content_type {content_type!r} is not 'base64'")
    return [v.encode() for v in values]


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of nested JSON lists (the protocol allows nested or flat data)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def _shape(shape: list[Any], name: str) -> list[int]:
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidParameter(f"input {name!r}: shape {shape} must hold integers")
    return shape


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what} must be a non-empty string")
    return value


# -- response --------------------------------------------------------------------------
def infer_response(result: oip.InferResponse, binary_out: Mapping[str, bool]) -> Response:
    """JSON, or JSON then binary outputs (with ``Inference-Header-Content-Length``)."""
    outputs, chunks = [], []
    for t in result.outputs:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary_out.get(t.name, binary_out[""]):
            raw = oip.raw_contents(t)
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif t.datatype == oip.BYTES:
            out["data"] = [b.decode("utf-8", "replace") for b in t.data.reshape(-1)]
        else:
            out["data"] = t.data.reshape(-1).tolist()
        outputs.append(out)
    doc = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "outputs": outputs,
    }
    if result.id:
        doc["id"] = result.id
    header = json.dumps(doc).encode()
    if not chunks:
        return Response(header, mimetype="application/json")
    response = Response(b"".join([header, *chunks]), mimetype="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(header))
    return response


def error_response(exc: Exception) -> Response:
    """``{"error": detail}`` with the error table's status (and Retry-After for overload)."""
    if errors.resolve(exc) is None:
        log.exception("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        exc = ServingError(f"internal error (request id {g.request_id})")
    hidden = errors.hidden_detail(exc)
    if hidden is not None:
        log.warning("%s %s (request id %s): %s", request.method, request.path, g.request_id, hidden)
    response = jsonify({"error": errors.detail(exc)})
    response.status_code = errors.http_status(exc)
    retry_after = errors.retry_after(exc)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


for _blueprint in (bp, health_bp):
    _blueprint.register_error_handler(Exception, error_response)
