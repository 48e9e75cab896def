"""Request bodies the peer bench sends: one image in the form each framework documents.

``build_body(kind, image, spec)`` returns ``(path_suffix, content_type, body,
extra_headers)``; ``spec`` is the form's object from ``peer.json`` (``field``,
``input_name``). ``path_suffix`` is unused (the path is the form's ``path``); it is
``""`` for every kind here. A peer whose framework wants another shape names
``"body": "custom"`` and ships ``body.py`` with ``build(image) -> (content_type,
body, headers)`` in its own directory.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path
from typing import Any

BOUNDARY = "peerbenchboundary"


def jpeg(image: bytes, spec: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    return "image/jpeg", image, {}


def multipart(image: bytes, spec: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    field = spec.get("field", "image")
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="x.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={BOUNDARY}", body, {}


def kserve_v1_b64(image: bytes, spec: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    b64 = base64.b64encode(image).decode()
    return (
        "application/json",
        json.dumps({"instances": [{"image_bytes": {"b64": b64}}]}).encode(),
        {},
    )


def json_b64(image: bytes, spec: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """A JSON object with one field (``field``, default ``image``) holding the base64 of
    the file: what frameworks that parse every body as JSON (LitServe) take."""
    body = json.dumps({spec.get("field", "image"): base64.b64encode(image).decode()}).encode()
    return "application/json", body, {}


def oip_json_b64(image: bytes, spec: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """Open Inference Protocol v2 JSON: one BYTES input holding the base64 of the file."""
    tensor = {
        "name": spec.get("input_name", "input"),
        "shape": [1],
        "datatype": "BYTES",
        "parameters": {"content_type": "base64"},
        "data": [base64.b64encode(image).decode()],
    }
    return "application/json", json.dumps({"inputs": [tensor]}).encode(), {}


def oip_binary(image: bytes, spec: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """Open Inference Protocol v2 with the binary tensor data extension: a JSON header,
    then one BYTES element (4-byte little-endian length, then the file)."""
    raw = len(image).to_bytes(4, "little") + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": spec.get("input_name", "input"),
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    return "application/octet-stream", header + raw, headers


BUILDERS = {
    "jpeg": jpeg,
    "multipart": multipart,
    "json-b64": json_b64,
    "kserve-v1-b64": kserve_v1_b64,
    "oip-json-b64": oip_json_b64,
    "oip-binary": oip_binary,
}


def build_body(
    kind: str, image: bytes, spec: dict[str, Any], peer_dir: Path | None = None
) -> tuple[str, str, bytes, dict[str, str]]:
    """(path suffix, content type, body, extra headers) of one image as ``kind``;
    ``"custom"`` calls ``build`` of ``peer_dir/body.py``."""
    if kind == "custom":
        if peer_dir is None:
            raise ValueError("a custom body needs the peer's directory")
        loader = importlib.util.spec_from_file_location(
            f"peer_body_{peer_dir.name}", peer_dir / "body.py"
        )
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        ctype, body, headers = module.build(image)
        return "", ctype, body, dict(headers)
    if kind not in BUILDERS:
        raise ValueError(f"unknown body kind {kind!r}; known: {sorted(BUILDERS)} and 'custom'")
    ctype, body, headers = BUILDERS[kind](image, spec)
    return "", ctype, body, headers
