"""Request bodies of ``/v1/classify`` and ``/v1/detect`` -> encoded images and options.

Three body forms are accepted:

- ``multipart/form-data`` with one or more ``image`` file fields; options as form
  fields or query parameters;
- a raw ``image/*`` (or ``application/octet-stream``) body holding one image;
  options as query parameters;
- ``application/json`` in TF Serving's row format,
  ``{"instances": [{"b64": "..."}, ...], "model": ..., "top_k": ...}``; options as
  keys beside ``instances`` or as query parameters.

Anything else is 415. The per-request deadline may be shortened with the
``X-Request-Timeout`` header (seconds).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from flask import Request

from serving.errors import (
    BadRequest,
    InvalidParameter,
    PayloadTooLarge,
    TooManyImages,
    TooManyParts,
    UnsupportedMediaType,
)
from serving.service import PredictOptions

OPTION_NAMES = ("model", "version", "label", "top_k", "score_threshold", "max_detections")
TIMEOUT_HEADER = "X-Request-Timeout"
RAW_TYPES = ("application/octet-stream",)
#: Deepest JSON nesting any request body may have. The real documents are 3 levels deep
#: (object -> list -> object); the bound keeps a 2 KB ``[[[[...]]]]`` from reaching
#: the parser's or ``repr``'s recursion limit (a 500 with a logged traceback).
MAX_JSON_DEPTH = 32


def parse_predict_request(request: Request, max_images: int) -> tuple[list[bytes], PredictOptions]:
    """The images and options of a predict request; raises typed 400/413/415 errors."""
    mimetype = (request.mimetype or "").lower()
    values: dict[str, Any] = {}
    _merge(values, request.args, "query")
    if mimetype == "multipart/form-data":
        _check_part_count(request)
        files = request.files.getlist("image")
        unexpected = sorted(set(request.files) - {"image"})
        if unexpected:
            raise BadRequest(f"unexpected file fields {unexpected}; send images as 'image'")
        if not files:
            raise BadRequest("multipart body has no 'image' field")
        if len(files) > max_images:
            raise TooManyImages(f"{len(files)} images in one request, limit is {max_images}")
        _merge(values, request.form, "form")
        images = [f.read() for f in files]
    elif mimetype.startswith("image/") or mimetype in RAW_TYPES:
        images = [read_body(request)]
        if not images[0]:
            raise BadRequest("empty request body")
    elif mimetype == "application/json":
        images, body_options = _parse_json(read_body(request), max_images)
        _merge(values, body_options, "JSON body")
    elif not mimetype and not request.content_length and not read_body(request):
        raise BadRequest("empty request body")
    else:
        raise UnsupportedMediaType(
            f"content type {mimetype or '(none)'!r} is not accepted; send multipart/form-data "
            "with 'image' fields, a raw image/* body, or application/json with 'instances'"
        )
    values["timeout_s"] = request_timeout(request)
    return images, options_from(values)


def request_timeout(request: Request) -> float | None:
    """The ``X-Request-Timeout`` header in seconds (None when absent; 400 if not a number).

    ``PredictOptions`` checks that it is positive.
    """
    return number(TIMEOUT_HEADER, request.headers.get(TIMEOUT_HEADER), float)


def read_body(request: Request) -> bytes:
    """The whole body, never more than ``MAX_CONTENT_LENGTH`` bytes (413 beyond).

    Werkzeug checks a declared Content-Length, but it silently truncates a chunked
    body at the limit; the limit is enforced here by reading one byte past it.
    """
    limit = request.max_content_length
    if request.content_length is not None or limit is None:
        return request.get_data(cache=False)
    stream = request.environ["wsgi.input"]
    body = bytearray()
    while len(body) <= limit:
        chunk = stream.read(min(1 << 16, limit + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    return bytes(body)


def _check_part_count(request: Request) -> None:
    """TooManyParts when a multipart body has more parts than Werkzeug will parse.

    Werkzeug refuses such a body with the same bare 413 as an oversized one; the
    parts are counted here first (the body is already bounded by the size limit,
    and a boundary never occurs inside a part) so the client is told which it was.
    """
    limit = request.max_form_parts
    boundary = request.mimetype_params.get("boundary", "").encode("latin-1", "replace")
    if limit is None or not boundary:
        return  # no boundary: Werkzeug's parser reports the broken body (400)
    body = request.get_data(cache=True)  # the form parser reads this cached copy
    delimiter = b"--" + boundary
    # Every part opens with a delimiter line; the closing one ends in "--".
    parts = body.count(b"\n" + delimiter) + body.startswith(delimiter) - 1
    if parts > limit:
        raise TooManyParts(f"too many parts: {parts} multipart parts, limit is {limit}")


def options_from(values: Mapping[str, Any]) -> PredictOptions:
    """Typed :class:`PredictOptions` from strings or JSON values; 400 on a bad value."""
    return PredictOptions(
        model=_text("model", values.get("model")),
        version=number("version", values.get("version"), int),
        label=_text("label", values.get("label")),
        top_k=number("top_k", values.get("top_k"), int),
        score_threshold=number("score_threshold", values.get("score_threshold"), float),
        max_detections=number("max_detections", values.get("max_detections"), int),
        timeout_s=values.get("timeout_s"),
    )


def parse_json(body: bytes) -> Any:
    """The JSON document of a request body; 400 when it is not JSON or nested too deep."""
    try:
        doc = json.loads(body)
    except RecursionError:
        # CPython's decoder gives up at the interpreter's recursion limit (~1000 levels).
        raise BadRequest(_too_deep()) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if _depth(doc) > MAX_JSON_DEPTH:
        raise BadRequest(_too_deep())
    return doc


def _too_deep() -> str:
    return f"JSON body is nested more than {MAX_JSON_DEPTH} levels deep"


def _depth(doc: Any) -> int:
    """Nesting depth of a parsed document, without recursion (a list of lists is 2)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                break  # already too deep: no need to walk the rest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return deepest


def _merge(values: dict[str, Any], source: Mapping[str, Any], where: str) -> None:
    getlist = getattr(source, "getlist", None)
    for key in source:
        if key not in OPTION_NAMES:
            raise InvalidParameter(f"unknown parameter {key!r} in the {where}")
        # A repeated query or form field (top_k=1&top_k=5) is ambiguous: refuse it
        # rather than silently keep the first.
        if getlist is not None and len(getlist(key)) > 1:
            raise InvalidParameter(f"parameter {key!r} is given more than once in the {where}")
        value = source[key]
        if key in values and values[key] != value:
            raise InvalidParameter(f"parameter {key!r} is given twice with different values")
        values[key] = value


def _text(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidParameter(f"{name!r} must be a string")
    return value


def number(name: str, value: Any, typ: type) -> Any:
    """``value`` (a JSON number or a numeric string) as ``typ``; None when absent or empty.

    400 (InvalidParameter) for anything else: booleans, fractions for an integer,
    text that is not a number. Ranges are the caller's to check.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidParameter(f"{name!r} must be a number")
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return float(value)
    except (TypeError, ValueError, OverflowError):  # float(10**400) overflows
        raise InvalidParameter(
            f"{name!r} must be {'an integer' if typ is int else 'a number'}, got {value!r}"
        ) from None


def _parse_json(body: bytes, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    if not body:
        raise BadRequest("empty request body")
    doc = parse_json(body)
    if not isinstance(doc, dict) or "instances" not in doc:
        raise BadRequest('JSON body must be an object with "instances": [{"b64": ...}, ...]')
    instances = doc.pop("instances")
    if not isinstance(instances, list) or not instances:
        raise BadRequest('"instances" must be a non-empty list')
    if len(instances) > max_images:
        raise TooManyImages(f"{len(instances)} images in one request, limit is {max_images}")
    images = []
    for i, inst in enumerate(instances):
        # TF Serving's row format: {"b64": ...}, or a named input {"image": {"b64": ...}}.
        if isinstance(inst, dict) and "image" in inst and len(inst) == 1:
            inst = inst["image"]
        if not (isinstance(inst, dict) and set(inst) == {"b64"} and isinstance(inst["b64"], str)):
            raise BadRequest(f'instances[{i}] must be {{"b64": "<base64 image>"}}')
        try:
            images.append(base64.b64decode(inst["b64"], validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"instances[{i}].b64 is not valid base64") from None
    return images, doc
