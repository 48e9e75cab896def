"""The model card: one JSON document that makes a model version self-describing.

Stored at ``<name>/<version>/assets.extra/model_card.json``. The gateway
configures preprocessing, labels, drift references and box mapping from it and
from nothing else. Required keys (``validate_model_card`` checks them):

- ``schema_version``, ``name``, ``version``, ``task`` (classification|detection),
  ``labels``, ``created_at`` (ISO 8601 UTC)
- ``input``: ``height``, ``width``, ``channels``, ``dtype``, ``tensor`` (input name)
- ``signature``: ``name`` and the ``inputs``/``outputs`` with dtype and shape
- ``preprocessing``: :class:`contract.preprocessing.PreprocessSpec` as a dict
- ``bn_reference``: ``probes`` (name, channels, offset into the probe vector,
  moving_mean, moving_variance, epsilon), ``total_channels`` and ``pixel_stats``
  (per-channel mean/variance of the training data in model-input space)
- ``metrics``: held-out quality and the inference/training-mode ``parity`` report
- ``calibration``: ``temperature`` and how it was fitted
- ``lineage``: parent version, dataset fingerprint, parameters, code revision
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MODEL_CARD_RELPATH = "assets.extra/model_card.json"
WARMUP_RELPATH = "assets.extra/tf_serving_warmup_requests"
KERAS_MODEL_RELPATH = "assets.extra/model.keras"
TASKS = ("classification", "detection")
REQUIRED = (
    "schema_version",
    "name",
    "version",
    "task",
    "labels",
    "created_at",
    "input",
    "signature",
    "preprocessing",
    "bn_reference",
    "metrics",
    "calibration",
    "lineage",
)


class ModelCardError(ValueError):
    """A model card that is missing, unreadable or incomplete."""


def validate_model_card(card: dict[str, Any]) -> dict[str, Any]:
    """Check the required structure; returns the card unchanged or raises ModelCardError."""
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ModelCardError(f"model card lacks {missing}")
    if card["task"] not in TASKS:
        raise ModelCardError(f"task must be one of {TASKS}, got {card['task']!r}")
    if not card["labels"] or not all(isinstance(x, str) for x in card["labels"]):
        raise ModelCardError("labels must be a non-empty list of strings")
    for key in ("height", "width", "channels"):
        if not isinstance(card["input"].get(key), int):
            raise ModelCardError(f"input.{key} must be an integer")
    ref = card["bn_reference"]
    total = 0
    for probe in ref.get("probes", []):
        if probe["offset"] != total or len(probe["moving_mean"]) != probe["channels"]:
            raise ModelCardError(f"probe {probe.get('name')} is inconsistent")
        total += probe["channels"]
    if ref.get("total_channels") != total:
        raise ModelCardError("bn_reference.total_channels does not match the probes")
    if "temperature" not in card["calibration"]:
        raise ModelCardError("calibration.temperature is required")
    return card


def load_model_card(version_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate the model card of a version directory."""
    path = Path(version_dir) / MODEL_CARD_RELPATH
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelCardError(f"no model card at {path}") from exc
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"model card {path} is not JSON: {exc}") from exc
    return validate_model_card(card)


def write_model_card(version_dir: str | os.PathLike[str], card: dict[str, Any]) -> Path:
    """Validate and write the card into a (staging) version directory."""
    validate_model_card(card)
    path = Path(version_dir) / MODEL_CARD_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path
